// Enforcement decisions, live: WatchDecisions sends a snapshot of the
// effective decisions (one per target), then deltas with revisions. A
// reconnect passes the last applied revision and gets only the deltas after
// it (or, if the server no longer keeps them, a fresh snapshot that replaces
// everything). Entries past their expiry are dropped locally as well.
import { useRef, useState } from "preact/hooks";
import { api, errorText, type Identity } from "../api.js";
import { DecisionOriginKind, DecisionScope, DecisionType, DeltaKind, type EffectiveDecision, type WatchDecisionsResponse } from "../gen/picket/v1/enforcement_pb.js";
import { HEARTBEAT_SECONDS } from "../live.js";
import { ErrorLine, Header, Status, useLive, useNow } from "../ui.js";
import { enumText, ms, span } from "../util.js";

const key = (d: EffectiveDecision) => `${d.scope}/${d.value}`;

export function Decisions({ me }: { me: Identity }) {
  const decisions = useRef(new Map<string, EffectiveDecision>());
  const snapshot = useRef<Map<string, EffectiveDecision> | null>(null);
  const revision = useRef(0n);
  const [, setVersion] = useState(0);
  const [error, setError] = useState("");
  const now = useNow(1000);

  const state = useLive<WatchDecisionsResponse>(
    "decisions",
    () => ({
      open: (signal, onHeader) => {
        snapshot.current = null;
        return api.enforcement.watchDecisions(
          { afterRevision: revision.current, heartbeatIntervalSeconds: HEARTBEAT_SECONDS },
          { signal, onHeader },
        );
      },
      onMessage(m) {
        switch (m.item.case) {
          case "snapshot":
            snapshot.current ??= new Map();
            for (const d of m.item.value.decisions) snapshot.current.set(key(d), d);
            return;
          case "snapshotComplete":
            decisions.current = snapshot.current ?? new Map();
            snapshot.current = null;
            revision.current = m.item.value.revision;
            break;
          case "deltas":
            for (const delta of m.item.value.deltas) {
              const d = delta.decision;
              if (!d) continue;
              if (delta.kind === DeltaKind.ADDED || delta.kind === DeltaKind.UPDATED) decisions.current.set(key(d), d);
              else decisions.current.delete(key(d));
            }
            revision.current = m.item.value.revision;
            break;
          case "heartbeat":
            if (m.item.value.revision > revision.current) revision.current = m.item.value.revision;
            return;
          default:
            return;
        }
        setVersion((v) => v + 1);
      },
    }),
    [],
  );

  const revoke = async (d: EffectiveDecision) => {
    setError("");
    try {
      await api.enforcement.revokeDecision({ decisionId: d.decisionId, reason: "revoked in the console" });
    } catch (e) {
      setError(errorText(e));
    }
  };

  const rows = [...decisions.current.values()]
    .filter((d) => ms(d.expiresAt) > now)
    .sort((a, b) => a.value.localeCompare(b.value));

  return (
    <section id="decisions">
      <Header title="Decisions">
        <Status name="decisions" state={state} />
        <span class="revision">revision {String(revision.current)}</span>
      </Header>
      <ErrorLine error={error} />
      <table class="grid">
        <thead>
          <tr>
            <th>type</th>
            <th>scope</th>
            <th>target</th>
            <th>origin</th>
            <th>reason</th>
            <th>expires in</th>
            {me.respond ? <th></th> : null}
          </tr>
        </thead>
        <tbody>
          {rows.map((d) => (
            <tr key={key(d)} data-decision-id={d.decisionId} data-value={d.value} data-type={enumText(DecisionType, d.type, "")}>
              <td class={`dtype dtype-${enumText(DecisionType, d.type, "")}`}>
                {enumText(DecisionType, d.type, "")}
                {d.type === DecisionType.THROTTLE ? ` ${d.throttlePerMinute}/min` : ""}
              </td>
              <td>{enumText(DecisionScope, d.scope, "")}</td>
              <td>
                <code>{d.value}</code>
              </td>
              <td>
                {enumText(DecisionOriginKind, d.origin?.kind ?? 0, "")} <code>{d.origin?.id}</code>
              </td>
              <td>{d.reason}</td>
              <td>{span((ms(d.expiresAt) - now) / 1000)}</td>
              {me.respond ? (
                <td>
                  <button class="revoke" onClick={() => revoke(d)}>
                    revoke
                  </button>
                </td>
              ) : null}
            </tr>
          ))}
        </tbody>
      </table>
      {rows.length === 0 ? <p class="empty">No decision in force.</p> : null}
    </section>
  );
}
