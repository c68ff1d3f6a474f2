// One incident, live: WatchIncident for its state and every change (each
// with the timeline entry that records it), GetIncident for its linked
// alerts and the timeline so far. Entries are kept by id, so the fetched
// timeline and the stream may overlap and an entry still shows once.
import { useRef, useState } from "preact/hooks";
import { api, errorText, type Identity } from "../api.js";
import type { Alert } from "../gen/picket/v1/alert_pb.js";
import { IncidentStatus, TimelineEntryKind, type Incident as Inc, type TimelineEntry, type WatchIncidentResponse } from "../gen/picket/v1/incident_pb.js";
import { Outcome } from "../gen/picket/v1/ingest_pb.js";
import { HEARTBEAT_SECONDS } from "../live.js";
import { ErrorLine, Header, Status, useLive } from "../ui.js";
import { entity, enumText, ms, severity, when } from "../util.js";
import { incidentStatus } from "./incidents.js";

const next: Record<number, IncidentStatus[]> = {
  [IncidentStatus.OPEN]: [IncidentStatus.INVESTIGATING, IncidentStatus.CONTAINED, IncidentStatus.RESOLVED],
  [IncidentStatus.INVESTIGATING]: [IncidentStatus.CONTAINED, IncidentStatus.RESOLVED],
  [IncidentStatus.CONTAINED]: [IncidentStatus.RESOLVED],
  [IncidentStatus.RESOLVED]: [IncidentStatus.CLOSED, IncidentStatus.OPEN],
};

export function Incident({ id, me }: { id: string; me: Identity }) {
  const incident = useRef<Inc | null>(null);
  const timeline = useRef(new Map<string, TimelineEntry>());
  const alerts = useRef<Alert[]>([]);
  const cursor = useRef("");
  const [, setVersion] = useState(0);
  const [error, setError] = useState("");
  const [note, setNote] = useState("");
  const [mergeIds, setMergeIds] = useState("");
  const bump = () => setVersion((v) => v + 1);

  const refresh = async () => {
    try {
      const res = await api.incidents.getIncident({ incidentId: id });
      if (res.incident && (!incident.current || ms(incident.current.updatedAt) <= ms(res.incident.updatedAt))) {
        incident.current = res.incident;
      }
      for (const e of res.timeline) timeline.current.set(e.id, e);
      alerts.current = res.alerts;
      bump();
    } catch (e) {
      setError(errorText(e));
    }
  };

  const state = useLive<WatchIncidentResponse>(
    `incident`,
    () => {
      incident.current = null;
      timeline.current = new Map();
      alerts.current = [];
      cursor.current = "";
      return {
        open: (signal, onHeader) =>
          api.incidents.watchIncident(
            { incidentId: id, options: { afterCursor: cursor.current, heartbeatIntervalSeconds: HEARTBEAT_SECONDS } },
            { signal, onHeader },
          ),
        onOpen: refresh,
        onMessage(m) {
          if (m.item.case !== "change") return;
          const { incident: inc, entry } = m.item.value;
          if (inc) incident.current = inc;
          if (entry) {
            timeline.current.set(entry.id, entry);
            if (entry.kind === TimelineEntryKind.ALERT_LINKED || entry.kind === TimelineEntryKind.ALERT_UNLINKED || entry.kind === TimelineEntryKind.MERGED) {
              void refresh();
            }
          }
          if (m.cursor) cursor.current = m.cursor;
          bump();
        },
        onResetNeeded() {
          cursor.current = "";
          return true;
        },
      };
    },
    [id],
  );

  const act = async (f: () => Promise<unknown>) => {
    setError("");
    try {
      await f();
    } catch (e) {
      setError(errorText(e));
    }
  };
  const inc = incident.current;
  const entries = [...timeline.current.values()].sort((a, b) => ms(a.at) - ms(b.at) || a.id.localeCompare(b.id));

  return (
    <section id="incident" data-incident-id={id}>
      <Header title={inc ? inc.title : "Incident"}>
        <Status name="incident" state={state} />
      </Header>
      <ErrorLine error={error} />
      {inc ? (
        <div class="incident-meta">
          <span class={`sev sev-${severity(inc.severity)}`}>{severity(inc.severity)}</span>{" "}
          <span class="incident-status">{incidentStatus[inc.status]}</span> · {inc.alertCount} alerts · {inc.entities.map(entity).join(", ")}
          {inc.assignee ? ` · assigned to ${inc.assignee}` : ""}
          {inc.mergedIntoId ? (
            <>
              {" "}· merged into <a href={`#/incident/${inc.mergedIntoId}`}>{inc.mergedIntoId}</a>
            </>
          ) : null}
          <p>{inc.description}</p>
          {me.respond ? (
            <div class="incident-actions">
              {(next[inc.status] ?? []).map((s) => (
                <button
                  class={`to-${incidentStatus[s]}`}
                  onClick={() => act(() => api.incidents.updateIncident({ incidentId: id, updateMask: ["status"], status: s }))}
                >
                  → {incidentStatus[s]}
                </button>
              ))}
            </div>
          ) : null}
        </div>
      ) : null}
      <div class="columns">
        <div>
          <h3>Timeline</h3>
          <ol class="timeline">
            {entries.map((e) => (
              <li key={e.id} data-entry-id={e.id} data-kind={enumText(TimelineEntryKind, e.kind, "")}>
                <time>{when(e.at)}</time> <b>{e.actor}</b> {e.description}
                {e.kind === TimelineEntryKind.NOTE_ADDED ? <blockquote class="note">{e.subject}</blockquote> : null}
              </li>
            ))}
          </ol>
          {me.respond ? (
            <form
              class="note-form"
              onSubmit={(ev) => {
                ev.preventDefault();
                const text = note.trim();
                if (!text) return;
                void act(async () => {
                  const res = await api.incidents.addNote({ incidentId: id, text });
                  if (res.entry) timeline.current.set(res.entry.id, res.entry);
                  setNote("");
                  bump();
                });
              }}
            >
              <textarea id="note-text" value={note} onInput={(e) => setNote(e.currentTarget.value)} placeholder="Add a note" />
              <button type="submit" id="add-note">Add note</button>
            </form>
          ) : null}
          {me.respond ? (
            <form
              class="merge-form"
              onSubmit={(ev) => {
                ev.preventDefault();
                const ids = mergeIds.split(/[\s,]+/).filter(Boolean);
                if (ids.length === 0) return;
                void act(async () => {
                  await api.incidents.mergeIncidents({ targetIncidentId: id, sourceIncidentIds: ids });
                  setMergeIds("");
                });
              }}
            >
              <input id="merge-ids" value={mergeIds} onInput={(e) => setMergeIds(e.currentTarget.value)} placeholder="incident ids to merge into this one" />
              <button type="submit">Merge</button>
            </form>
          ) : null}
        </div>
        <div>
          <h3>Linked alerts</h3>
          {alerts.current.map((a) => (
            <details class="linked-alert" data-alert-id={a.id} open>
              <summary>
                <span class={`sev sev-${severity(a.severity)}`}>{severity(a.severity)}</span> {a.title} ({a.sourceName}, ×{a.occurrenceCount})
              </summary>
              <table class="grid small">
                <thead>
                  <tr>
                    <th>at</th>
                    <th>type</th>
                    <th>actor</th>
                    <th>source ip</th>
                    <th>outcome</th>
                  </tr>
                </thead>
                <tbody>
                  {a.evidence.slice(0, 20).map((ev) => (
                    <tr class="evidence" key={ev.eventId}>
                      <td>{when(ev.snapshot?.occurredAt)}</td>
                      <td>{ev.snapshot?.eventType}</td>
                      <td>{ev.snapshot?.actor}</td>
                      <td>{ev.snapshot?.sourceIp}</td>
                      <td>{enumText(Outcome, ev.snapshot?.outcome ?? 0, "OUTCOME_")}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </details>
          ))}
        </div>
      </div>
    </section>
  );
}
