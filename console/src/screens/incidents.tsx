// Incidents, live: WatchIncidents sends a snapshot, a marker, then every
// change with a durable cursor. A reconnect resumes after the last cursor
// (no snapshot); without one (or with one the server no longer keeps) it
// starts over with a fresh snapshot that replaces the list.
import { useRef, useState } from "preact/hooks";
import { api } from "../api.js";
import { IncidentChangeKind, IncidentStatus, type Incident, type WatchIncidentsResponse } from "../gen/picket/v1/incident_pb.js";
import { HEARTBEAT_SECONDS } from "../live.js";
import { Header, Status, useLive, useNow } from "../ui.js";
import { age, entity, ms, severity } from "../util.js";

export const incidentStatus: Record<number, string> = {
  [IncidentStatus.OPEN]: "open",
  [IncidentStatus.INVESTIGATING]: "investigating",
  [IncidentStatus.CONTAINED]: "contained",
  [IncidentStatus.RESOLVED]: "resolved",
  [IncidentStatus.CLOSED]: "closed",
};

export function Incidents() {
  const incidents = useRef(new Map<string, Incident>());
  const snapshot = useRef<Map<string, Incident> | null>(null);
  const cursor = useRef("");
  const [, setVersion] = useState(0);
  const [showClosed, setShowClosed] = useState(false);
  const now = useNow();

  const state = useLive<WatchIncidentsResponse>(
    "incidents",
    () => ({
      open: (signal, onHeader) => {
        snapshot.current = cursor.current ? null : new Map();
        return api.incidents.watchIncidents(
          { options: { afterCursor: cursor.current, heartbeatIntervalSeconds: HEARTBEAT_SECONDS } },
          { signal, onHeader },
        );
      },
      onMessage(m) {
        switch (m.item.case) {
          case "change": {
            const inc = m.item.value.incident;
            if (!inc) return;
            if (m.item.value.kind === IncidentChangeKind.SNAPSHOT && snapshot.current) {
              snapshot.current.set(inc.id, inc);
            } else {
              incidents.current.set(inc.id, inc);
            }
            if (m.cursor) cursor.current = m.cursor;
            break;
          }
          case "snapshotComplete":
            if (snapshot.current) incidents.current = snapshot.current;
            snapshot.current = null;
            break;
          default:
            return;
        }
        setVersion((v) => v + 1);
      },
      onResetNeeded() {
        cursor.current = "";
        return true;
      },
    }),
    [],
  );

  const rows = [...incidents.current.values()]
    .filter((i) => showClosed || (i.status !== IncidentStatus.CLOSED && i.status !== IncidentStatus.RESOLVED))
    .sort((a, b) => ms(b.updatedAt) - ms(a.updatedAt));

  return (
    <section id="incidents">
      <Header title="Incidents">
        <Status name="incidents" state={state} />
        <label>
          <input type="checkbox" checked={showClosed} onChange={(e) => setShowClosed(e.currentTarget.checked)} /> show resolved and closed
        </label>
      </Header>
      <table class="grid">
        <thead>
          <tr>
            <th>severity</th>
            <th>status</th>
            <th>incident</th>
            <th>alerts</th>
            <th>entities</th>
            <th>assignee</th>
            <th>updated</th>
          </tr>
        </thead>
        <tbody>
          {rows.map((i) => (
            <tr key={i.id} data-incident-id={i.id}>
              <td>
                <span class={`sev sev-${severity(i.severity)}`}>{severity(i.severity)}</span>
              </td>
              <td>{incidentStatus[i.status]}</td>
              <td>
                <a href={`#/incident/${i.id}`}>{i.title}</a>
              </td>
              <td>{i.alertCount}</td>
              <td class="entities">{i.entities.map(entity).join(", ")}</td>
              <td>{i.assignee}</td>
              <td>{age(i.updatedAt, now)} ago</td>
            </tr>
          ))}
        </tbody>
      </table>
      {rows.length === 0 ? <p class="empty">No incidents.</p> : null}
    </section>
  );
}
