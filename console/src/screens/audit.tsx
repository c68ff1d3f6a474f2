// Audit log: QueryEvents with filters and pagination (newest first), and a
// live tail (TailEvents) that shows matching events as they are committed,
// resuming after its last cursor across reconnects.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, errorText } from "../api.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { EventFilterSchema, Outcome, type Event, type TailEventsResponse } from "../gen/picket/v1/ingest_pb.js";
import { HEARTBEAT_SECONDS } from "../live.js";
import { ErrorLine, Header, Status, useLive } from "../ui.js";
import { enumText, severity, ts, when } from "../util.js";

interface Filters {
  eventType: string;
  actor: string;
  sourceIp: string;
  outcome: number;
  hours: number;
}

function toFilter(f: Filters): MessageInitShape<typeof EventFilterSchema> {
  return {
    eventTypes: f.eventType ? [f.eventType] : [],
    actor: f.actor,
    sourceIp: f.sourceIp,
    outcome: f.outcome,
  };
}

export function Audit() {
  const [draft, setDraft] = useState<Filters>({ eventType: "", actor: "", sourceIp: "", outcome: 0, hours: 24 });
  // The applied filters and the end of their range, fixed when applied:
  // page tokens are valid only with the same filter and range.
  const [filters, setFilters] = useState<Filters & { end: number }>({ ...draft, end: Date.now() + 60_000 });
  const [pages, setPages] = useState<string[]>([""]); // page tokens: current is last
  const [events, setEvents] = useState<Event[]>([]);
  const [nextToken, setNextToken] = useState("");
  const [error, setError] = useState("");
  const [tail, setTail] = useState(false);

  useEffect(() => {
    let stopped = false;
    const end = new Date(filters.end);
    api.events
      .queryEvents({
        timeRange: { start: ts(new Date(end.getTime() - filters.hours * 3600_000)), end: ts(end) },
        filter: toFilter(filters),
        pageSize: 50,
        pageToken: pages[pages.length - 1],
      })
      .then((res) => {
        if (stopped) return;
        setEvents(res.events);
        setNextToken(res.nextPageToken);
        setError("");
      })
      .catch((e) => !stopped && setError(errorText(e)));
    return () => {
      stopped = true;
    };
  }, [filters, pages]);

  const set = (k: keyof Filters) => (e: { currentTarget: { value: string } }) =>
    setDraft({ ...draft, [k]: k === "outcome" || k === "hours" ? Number(e.currentTarget.value) : e.currentTarget.value });

  return (
    <section id="audit">
      <Header title="Audit log">
        <label>
          <input id="tail-toggle" type="checkbox" checked={tail} onChange={(e) => setTail(e.currentTarget.checked)} /> live tail
        </label>
      </Header>
      <form
        class="filters"
        onSubmit={(e) => {
          e.preventDefault();
          setFilters({ ...draft, end: Date.now() + 60_000 });
          setPages([""]);
        }}
      >
        <input placeholder="event type" value={draft.eventType} onInput={set("eventType")} id="f-type" />
        <input placeholder="actor" value={draft.actor} onInput={set("actor")} id="f-actor" />
        <input placeholder="source ip" value={draft.sourceIp} onInput={set("sourceIp")} id="f-ip" />
        <select value={draft.outcome} onChange={set("outcome")} id="f-outcome">
          <option value={0}>any outcome</option>
          <option value={Outcome.SUCCESS}>success</option>
          <option value={Outcome.FAILURE}>failure</option>
        </select>
        <select value={draft.hours} onChange={set("hours")} id="f-hours">
          <option value={1}>last hour</option>
          <option value={24}>last 24 h</option>
          <option value={168}>last 7 days</option>
        </select>
        <button type="submit">Search</button>
      </form>
      <ErrorLine error={error} />
      {tail ? <Tail filters={filters} /> : null}
      <EventTable events={events} id="audit-events" />
      <div class="pager">
        <button disabled={pages.length <= 1} onClick={() => setPages(pages.slice(0, -1))}>
          ← newer
        </button>
        <span>page {pages.length}</span>
        <button id="older" disabled={!nextToken} onClick={() => setPages([...pages, nextToken])}>
          older →
        </button>
      </div>
    </section>
  );
}

function Tail({ filters }: { filters: Filters }) {
  const events = useRef<Event[]>([]);
  const seen = useRef(new Set<string>());
  const cursor = useRef("");
  const [, setVersion] = useState(0);
  const state = useLive<TailEventsResponse>(
    "tail",
    () => {
      events.current = [];
      seen.current = new Set();
      cursor.current = "";
      return {
        open: (signal, onHeader) =>
          api.events.tailEvents(
            { filter: toFilter(filters), options: { afterCursor: cursor.current, heartbeatIntervalSeconds: HEARTBEAT_SECONDS } },
            { signal, onHeader },
          ),
        onMessage(m) {
          if (m.item.case !== "event") return;
          const ev = m.item.value;
          cursor.current = m.cursor;
          if (seen.current.has(ev.id)) return;
          seen.current.add(ev.id);
          events.current = [ev, ...events.current].slice(0, 200);
          setVersion((v) => v + 1);
        },
        onResetNeeded() {
          cursor.current = "";
          return true;
        },
      };
    },
    [JSON.stringify(filters)],
  );
  return (
    <div class="tail">
      <h3>
        Live tail <Status name="tail" state={state} />
      </h3>
      <EventTable events={events.current} id="tail-events" />
    </div>
  );
}

function EventTable({ events, id }: { events: Event[]; id: string }) {
  return (
    <table class="grid small" id={id}>
      <thead>
        <tr>
          <th>occurred</th>
          <th>type</th>
          <th>actor</th>
          <th>action</th>
          <th>resource</th>
          <th>outcome</th>
          <th>severity</th>
          <th>source ip</th>
        </tr>
      </thead>
      <tbody>
        {events.map((e) => (
          <tr key={e.id} data-event-id={e.id}>
            <td>{when(e.occurredAt)}</td>
            <td>{e.eventType}</td>
            <td>{e.actor}</td>
            <td>{e.action}</td>
            <td>{e.resource}</td>
            <td>{enumText(Outcome, e.outcome, "")}</td>
            <td>{severity(e.severity)}</td>
            <td>{e.sourceIp}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
