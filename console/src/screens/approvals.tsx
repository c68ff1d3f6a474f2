// Approvals inbox and run progress, live: WatchPlaybookRuns for every run
// (a snapshot, then each transition, approval and step result). Runs waiting
// for approval show exactly what will execute (the resolved steps and
// parameters, and the digest the approval is bound to).
import { useRef, useState } from "preact/hooks";
import { api, errorText, type Identity } from "../api.js";
import { ActionKind, RunChangeKind, RunStatus, StepState, type PlaybookRun, type WatchPlaybookRunsResponse } from "../gen/picket/v1/playbook_pb.js";
import { HEARTBEAT_SECONDS } from "../live.js";
import { ErrorLine, Header, Status, useLive, useNow } from "../ui.js";
import { age, enumText, ms, when } from "../util.js";

export function Approvals({ me }: { me: Identity }) {
  const runs = useRef(new Map<string, PlaybookRun>());
  const snapshot = useRef<Map<string, PlaybookRun> | null>(null);
  const cursor = useRef("");
  const [, setVersion] = useState(0);
  const [error, setError] = useState("");
  const [comments, setComments] = useState<Record<string, string>>({});
  const now = useNow();
  const put = (r: PlaybookRun, into = runs.current) => {
    const old = into.get(r.id);
    if (!old || ms(old.updatedAt) <= ms(r.updatedAt)) into.set(r.id, r);
  };

  const state = useLive<WatchPlaybookRunsResponse>(
    "runs",
    () => ({
      open: (signal, onHeader) => {
        snapshot.current = cursor.current ? null : new Map();
        return api.playbooks.watchPlaybookRuns(
          { options: { afterCursor: cursor.current, heartbeatIntervalSeconds: HEARTBEAT_SECONDS } },
          { signal, onHeader },
        );
      },
      onMessage(m) {
        if (m.item.case === "change" && m.item.value.run) {
          const run = m.item.value.run;
          if (m.item.value.kind === RunChangeKind.SNAPSHOT && snapshot.current) put(run, snapshot.current);
          else put(run);
          if (m.cursor) cursor.current = m.cursor;
        } else if (m.item.case === "snapshotComplete") {
          if (snapshot.current) runs.current = snapshot.current;
          snapshot.current = null;
        } else return;
        setVersion((v) => v + 1);
      },
      onResetNeeded() {
        cursor.current = "";
        return true;
      },
    }),
    [],
  );

  const decide = async (run: PlaybookRun, approve: boolean) => {
    setError("");
    const comment = comments[run.id] ?? "";
    try {
      const res = approve
        ? await api.playbooks.approvePlaybookRun({ runId: run.id, comment, paramsDigest: run.paramsDigest })
        : await api.playbooks.rejectPlaybookRun({ runId: run.id, comment: comment || "rejected in the console" });
      if (res.run) put(res.run);
      setVersion((v) => v + 1);
    } catch (e) {
      setError(errorText(e));
    }
  };

  const all = [...runs.current.values()].sort((a, b) => ms(b.createdAt) - ms(a.createdAt));
  const pending = all.filter((r) => r.status === RunStatus.PENDING_APPROVAL);
  const others = all.filter((r) => r.status !== RunStatus.PENDING_APPROVAL).slice(0, 50);

  return (
    <section id="approvals">
      <Header title="Approvals">
        <Status name="runs" state={state} />
      </Header>
      <ErrorLine error={error} />
      <h3>Waiting for approval ({pending.length})</h3>
      {pending.length === 0 ? <p class="empty">Nothing waits for approval.</p> : null}
      {pending.map((run) => (
        <article class="run pending" data-run-id={run.id} key={run.id}>
          <header>
            <b>{run.playbookName}</b> v{run.playbookVersion} · requested by {run.requestedBy} {age(run.createdAt, now)} ago
            {run.incidentId ? (
              <>
                {" "}· <a href={`#/incident/${run.incidentId}`}>incident</a>
              </>
            ) : null}{" "}
            · approvals {run.approvals.filter((a) => a.approved).length}/{run.requiredApprovals} · deadline {when(run.approvalDeadline)}
          </header>
          <Steps run={run} />
          <p class="digest">parameters digest {run.paramsDigest}</p>
          {me.respond ? (
            <div class="decide">
              <input
                class="comment"
                placeholder="comment"
                value={comments[run.id] ?? ""}
                onInput={(e) => setComments({ ...comments, [run.id]: e.currentTarget.value })}
              />
              <button class="approve" onClick={() => decide(run, true)}>
                Approve
              </button>
              <button class="reject" onClick={() => decide(run, false)}>
                Reject
              </button>
            </div>
          ) : (
            <p class="hint">Your key cannot approve (it lacks the respond scope).</p>
          )}
        </article>
      ))}
      <h3>Recent runs</h3>
      {others.map((run) => (
        <article class="run" data-run-id={run.id} data-status={enumText(RunStatus, run.status, "")} key={run.id}>
          <header>
            <b>{run.playbookName}</b> · <span class="run-status">{enumText(RunStatus, run.status, "")}</span> · {age(run.updatedAt, now)} ago
            {run.statusReason ? ` · ${run.statusReason}` : ""}
          </header>
          <Steps run={run} />
        </article>
      ))}
    </section>
  );
}

function Steps({ run }: { run: PlaybookRun }) {
  return (
    <table class="grid small steps">
      <thead>
        <tr>
          <th>step</th>
          <th>action</th>
          <th>parameters</th>
          <th>state</th>
          <th>result</th>
        </tr>
      </thead>
      <tbody>
        {run.steps.map((s, i) => {
          const r = run.stepResults[i];
          return (
            <tr key={s.name} data-step={s.name}>
              <td>{s.name}</td>
              <td>{enumText(ActionKind, s.action, "")}</td>
              <td class="params">
                {Object.entries(s.params)
                  .sort(([a], [b]) => a.localeCompare(b))
                  .map(([k, v]) => (
                    <div>
                      <code>{k}</code> = <code class="param-value">{v}</code>
                    </div>
                  ))}
              </td>
              <td class="step-state">{r ? enumText(StepState, r.state, "") : ""}{r && r.attempts > 1 ? ` (${r.attempts} attempts)` : ""}</td>
              <td>{r?.message}</td>
            </tr>
          );
        })}
      </tbody>
    </table>
  );
}
