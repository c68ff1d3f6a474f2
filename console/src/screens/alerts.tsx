// Alert queue, live: ListAlerts for the current state, WatchAlerts for every
// change after it. Alerts are kept by id, and a state never replaces a newer
// one (by updated_at), so the list and the stream may overlap in any order
// and an alert is shown once. The stream resumes after the last cursor it
// delivered; before it delivered one, a reconnect lists again.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, errorText, type Identity } from "../api.js";
import { AlertStatus, type Alert, type WatchAlertsResponse } from "../gen/picket/v1/alert_pb.js";
import { HEARTBEAT_SECONDS } from "../live.js";
import { ErrorLine, Header, Status, useLive, useNow } from "../ui.js";
import { age, entity, ms, severity, severityNames } from "../util.js";

const statusText: Record<number, string> = {
  [AlertStatus.NEW]: "new",
  [AlertStatus.ACKNOWLEDGED]: "acknowledged",
  [AlertStatus.RESOLVED]: "resolved",
  [AlertStatus.FALSE_POSITIVE]: "false positive",
};

const statusFilters: Record<string, AlertStatus[]> = {
  open: [AlertStatus.NEW, AlertStatus.ACKNOWLEDGED],
  all: [],
  new: [AlertStatus.NEW],
  acknowledged: [AlertStatus.ACKNOWLEDGED],
  resolved: [AlertStatus.RESOLVED],
  false_positive: [AlertStatus.FALSE_POSITIVE],
};

/** When each alert first reached the screen (ms since the epoch), for latency. */
const shownAt = new Map<string, number>();

export function Alerts({ me }: { me: Identity }) {
  const alerts = useRef(new Map<string, Alert>());
  const cursor = useRef("");
  const [, setVersion] = useState(0);
  const [minSeverity, setMinSeverity] = useState(0);
  const [statusFilter, setStatusFilter] = useState("open");
  const [error, setError] = useState("");
  const now = useNow();
  const bump = () => setVersion((v) => v + 1);

  const put = (a: Alert) => {
    const old = alerts.current.get(a.id);
    if (!old || ms(old.updatedAt) <= ms(a.updatedAt)) alerts.current.set(a.id, a);
  };

  const state = useLive<WatchAlertsResponse>(
    "alerts",
    () => ({
      open: (signal, onHeader) =>
        api.alerts.watchAlerts(
          { options: { afterCursor: cursor.current, heartbeatIntervalSeconds: HEARTBEAT_SECONDS } },
          { signal, onHeader },
        ),
      async onOpen() {
        if (cursor.current) return;
        // Started from the head: everything before it comes from the list.
        try {
          const page = await api.alerts.listAlerts({ pageSize: 1000 });
          page.alerts.forEach(put);
          bump();
        } catch (e) {
          setError(errorText(e));
        }
      },
      onMessage(m) {
        if (m.item.case === "alert") {
          put(m.item.value);
          cursor.current = m.cursor;
          bump();
        }
      },
      onResetNeeded() {
        cursor.current = "";
        return true;
      },
    }),
    [],
  );

  useEffect(() => {
    const t = Date.now();
    for (const el of document.querySelectorAll<HTMLElement>("tr[data-alert-id]")) {
      const id = el.dataset.alertId!;
      if (!shownAt.has(id)) shownAt.set(id, t);
      el.dataset.shownAt = String(shownAt.get(id));
    }
  });

  const statuses = statusFilters[statusFilter] ?? [];
  const rows = [...alerts.current.values()]
    .filter((a) => a.severity >= minSeverity && (statuses.length === 0 || statuses.includes(a.status)))
    .sort((a, b) => ms(b.lastSeen) - ms(a.lastSeen));

  const update = async (a: Alert, status: AlertStatus) => {
    setError("");
    try {
      const res = await api.alerts.updateAlert({ alertId: a.id, status, note: "from the console" });
      if (res.alert) put(res.alert);
      bump();
    } catch (e) {
      setError(errorText(e));
    }
  };

  return (
    <section id="alerts">
      <Header title="Alert queue">
        <Status name="alerts" state={state} />
        <label>
          min severity{" "}
          <select id="alert-min-severity" value={minSeverity} onChange={(e) => setMinSeverity(Number(e.currentTarget.value))}>
            {severityNames.map((n, i) => (
              <option value={i}>{i === 0 ? "any" : n}</option>
            ))}
          </select>
        </label>
        <label>
          status{" "}
          <select id="alert-status" value={statusFilter} onChange={(e) => setStatusFilter(e.currentTarget.value)}>
            {Object.keys(statusFilters).map((k) => (
              <option value={k}>{k.replace("_", " ")}</option>
            ))}
          </select>
        </label>
      </Header>
      <ErrorLine error={error} />
      <table class="grid">
        <thead>
          <tr>
            <th>severity</th>
            <th>status</th>
            <th>alert</th>
            <th>rule</th>
            <th>entities</th>
            <th>seen</th>
            <th>age</th>
            <th>incident</th>
            {me.respond ? <th>actions</th> : null}
          </tr>
        </thead>
        <tbody>
          {rows.map((a) => (
            <tr key={a.id} data-alert-id={a.id} data-created-at={ms(a.createdAt)} data-status={statusText[a.status]} data-entities={a.entities.map(entity).join(" ")}>
              <td>
                <span class={`sev sev-${severity(a.severity)}`}>{severity(a.severity)}</span>
              </td>
              <td class="alert-status">{statusText[a.status] ?? a.status}</td>
              <td>{a.title}</td>
              <td>{a.sourceName}</td>
              <td class="entities">{a.entities.map(entity).join(", ")}</td>
              <td>×{a.occurrenceCount}</td>
              <td>{age(a.createdAt, now)}</td>
              <td>{a.incidentId ? <a href={`#/incident/${a.incidentId}`} class="incident-link">open</a> : ""}</td>
              {me.respond ? (
                <td class="actions">
                  {a.status === AlertStatus.NEW ? (
                    <button class="ack" onClick={() => update(a, AlertStatus.ACKNOWLEDGED)}>acknowledge</button>
                  ) : null}
                  {a.status !== AlertStatus.RESOLVED ? (
                    <button class="resolve" onClick={() => update(a, AlertStatus.RESOLVED)}>resolve</button>
                  ) : null}
                  {a.status !== AlertStatus.FALSE_POSITIVE ? (
                    <button class="fp" onClick={() => update(a, AlertStatus.FALSE_POSITIVE)}>false positive</button>
                  ) : null}
                </td>
              ) : null}
            </tr>
          ))}
        </tbody>
      </table>
      {rows.length === 0 ? <p class="empty">No alerts match.</p> : null}
    </section>
  );
}
