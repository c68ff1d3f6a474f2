// Dashboard: GetDashboardMetrics (time series in fixed buckets) and
// GetSecuritySummary (totals, response times, top entities) for one range,
// refreshed every REFRESH_MS. Charts are uPlot (canvas, no inline styles or
// scripts, so the strict CSP holds).
import { useEffect, useRef, useState } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { api, errorText } from "../api.js";
import type { GetDashboardMetricsResponse, GetSecuritySummaryResponse } from "../gen/picket/v1/report_pb.js";
import type { LiveState } from "../live.js";
import { ErrorLine, Header, Status } from "../ui.js";
import { entity, ms, span, ts } from "../util.js";

const ranges: Record<string, [number, number]> = {
  // label: [range seconds, bucket seconds]
  "1h": [3600, 60],
  "6h": [6 * 3600, 300],
  "24h": [86400, 900],
  "7d": [7 * 86400, 3600],
  "30d": [30 * 86400, 6 * 3600],
};
const REFRESH_MS = 15000;

export function Dashboard() {
  const [range, setRange] = useState("1h");
  const [metrics, setMetrics] = useState<GetDashboardMetricsResponse | null>(null);
  const [summary, setSummary] = useState<GetSecuritySummaryResponse | null>(null);
  const [state, setState] = useState<LiveState>("connecting");
  const [error, setError] = useState("");

  useEffect(() => {
    let stopped = false;
    let failures = 0;
    const load = async () => {
      const [seconds, bucket] = ranges[range]!;
      // The range ends at the end of the current bucket, so "now" is inside it.
      const end = Math.ceil(Date.now() / 1000 / bucket) * bucket;
      const timeRange = { start: ts(new Date((end - seconds) * 1000)), end: ts(new Date(end * 1000)) };
      try {
        const [m, s] = await Promise.all([
          api.reports.getDashboardMetrics({ timeRange, bucketSeconds: bucket }),
          api.reports.getSecuritySummary({ timeRange }),
        ]);
        if (stopped) return;
        failures = 0;
        setMetrics(m);
        setSummary(s);
        setError("");
        setState("live");
      } catch (e) {
        if (stopped) return;
        failures++;
        setError(errorText(e));
        setState(failures > 1 ? "reconnecting" : "stale");
      }
    };
    void load();
    const t = setInterval(load, REFRESH_MS);
    return () => {
      stopped = true;
      clearInterval(t);
    };
  }, [range]);

  const b = metrics?.buckets ?? [];
  const x = b.map((k) => ms(k.start) / 1000);
  const num = (v: bigint) => Number(v);
  const totals = {
    events: b.reduce((n, k) => n + num(k.events), 0),
    failed: b.reduce((n, k) => n + num(k.failedLogins), 0),
    alerts: b.reduce((n, k) => n + num(k.alerts), 0),
  };

  return (
    <section id="dashboard">
      <Header title="Dashboard">
        <Status name="dashboard" state={[state, ""]} />
        <span class="ranges">
          {Object.keys(ranges).map((r) => (
            <button class={r === range ? "range active" : "range"} data-range={r} onClick={() => setRange(r)}>
              {r}
            </button>
          ))}
        </span>
      </Header>
      <ErrorLine error={error} />
      {summary ? (
        <div class="kpis">
          <Kpi name="events" value={String(summary.eventsTotal)} />
          <Kpi name="failed logins" value={String(summary.failedLogins)} />
          <Kpi name="alerts" value={String(summary.alertsTotal)} />
          <Kpi name="incidents opened" value={String(summary.incidentsOpened)} />
          <Kpi name="incidents open" value={String(summary.incidentsOpen)} />
          <Kpi name="MTTA" value={rt(summary.timeToAcknowledge)} />
          <Kpi name="MTTR" value={rt(summary.timeToResolve)} />
        </div>
      ) : null}
      <div class="charts">
        <Chart
          id="chart-events"
          title="Events and failed logins"
          total={totals.events + totals.failed}
          data={[x, b.map((k) => num(k.events)), b.map((k) => num(k.failedLogins))]}
          series={[
            { label: "events", stroke: "#4f8cc9" },
            { label: "failed logins", stroke: "#d9534f" },
          ]}
        />
        <Chart
          id="chart-alerts"
          title="Alerts by severity"
          total={totals.alerts}
          data={[
            x,
            b.map((k) => num(k.alertsBySeverity?.critical ?? 0n)),
            b.map((k) => num(k.alertsBySeverity?.high ?? 0n)),
            b.map((k) => num(k.alertsBySeverity?.medium ?? 0n)),
            b.map((k) => num(k.alertsBySeverity?.low ?? 0n)),
            b.map((k) => num(k.alertsBySeverity?.info ?? 0n)),
          ]}
          series={[
            { label: "critical", stroke: "#8b0000" },
            { label: "high", stroke: "#d9534f" },
            { label: "medium", stroke: "#f0ad4e" },
            { label: "low", stroke: "#5bc0de" },
            { label: "info", stroke: "#999" },
          ]}
        />
      </div>
      {summary ? (
        <div class="columns">
          <div>
            <h3>Top entities</h3>
            <table class="grid small" id="top-entities">
              <tbody>
                {summary.topEntities.map((e) => (
                  <tr>
                    <td>{e.entity ? entity(e.entity) : ""}</td>
                    <td>{String(e.alertCount)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          <div>
            <h3>Alerts by rule</h3>
            <table class="grid small" id="alerts-by-rule">
              <tbody>
                {summary.alertsByRule.map((r) => (
                  <tr>
                    <td>{r.sourceName}</td>
                    <td>{r.title}</td>
                    <td>{String(r.count)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        </div>
      ) : null}
    </section>
  );
}

function rt(r: { meanSeconds: number; incidents: bigint } | undefined): string {
  return r && r.incidents > 0n ? span(r.meanSeconds) : "–";
}

function Kpi({ name, value }: { name: string; value: string }) {
  return (
    <div class="kpi" data-kpi={name}>
      <div class="kpi-value">{value}</div>
      <div class="kpi-name">{name}</div>
    </div>
  );
}

function Chart(props: { id: string; title: string; total: number; data: number[][]; series: { label: string; stroke: string }[] }) {
  const el = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const shape = props.series.map((s) => s.label).join(",");
  useEffect(() => {
    if (!el.current) return;
    const opts: uPlot.Options = {
      width: 560,
      height: 220,
      series: [{}, ...props.series.map((s) => ({ label: s.label, stroke: s.stroke, width: 2, points: { show: false } }))],
      axes: [{}, { size: 50 }],
      scales: { x: { time: true } },
      legend: { show: true },
    };
    plot.current = new uPlot(opts, props.data as uPlot.AlignedData, el.current);
    return () => {
      plot.current?.destroy();
      plot.current = null;
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [shape]);
  useEffect(() => {
    plot.current?.setData(props.data as uPlot.AlignedData);
  });
  return (
    <figure class="chart" id={props.id} data-points={props.data[0]?.length ?? 0} data-total={props.total}>
      <figcaption>{props.title}</figcaption>
      <div ref={el} />
    </figure>
  );
}
