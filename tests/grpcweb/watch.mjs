// A real grpc-web client for Picket's IncidentService/WatchIncidents, run by
// tests/api/grpcweb.rs: Connect's grpc-web transport over Node's global fetch
// (HTTP/1.1), the same code path a browser console would use.
//
//   node watch.mjs BASE_URL API_KEY LIVE_CHANGES
//
// 1. Watches without a key and reports the error.
// 2. Watches with the key: reports the snapshot, then `ready`, then changes;
//    after LIVE_CHANGES changes it closes the stream and reports
//    `disconnected` with the last cursor.
// 3. Waits for one line on stdin, then watches again with after_cursor set to
//    that cursor, reports changes until the server ends the stream, reports
//    `end` and exits 0.
//
// Every report is one JSON object on one line of stdout. Any failure (a
// stream that ends with an error, or without the status trailer grpc-web
// carries in the body) is printed to stderr and exits non-zero.

import { createInterface } from "node:readline";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import {
  IncidentChangeKind,
  IncidentChangeKindSchema,
  IncidentService,
  IncidentStatusSchema,
  TimelineEntryKindSchema,
} from "./gen/picket/v1/incident_pb.js";

const [baseUrl, apiKey, liveArg] = process.argv.slice(2);
const liveChanges = Number(liveArg);
if (!baseUrl || !apiKey || !(liveChanges > 0)) {
  console.error("usage: node watch.mjs BASE_URL API_KEY LIVE_CHANGES");
  process.exit(2);
}

/** The origin a browser page would send; the server's CORS layer answers it. */
const ORIGIN = "http://console.example.com";

const client = createClient(
  IncidentService,
  createGrpcWebTransport({ baseUrl, fetch: globalThis.fetch }),
);

/** Prints one report line (stdout to a pipe is synchronous on Linux). */
function report(fields) {
  process.stdout.write(JSON.stringify(fields) + "\n");
}

/** The proto name of enum value `n` (e.g. INCIDENT_STATUS_OPEN). */
function enumName(schema, n) {
  return schema.value[n]?.name ?? `unknown(${n})`;
}

/** One stream item as a report. */
function describe(phase, res) {
  const { item, cursor } = res;
  switch (item.case) {
    case "change": {
      const { kind, incident, entry } = item.value;
      return {
        phase,
        kind: kind === IncidentChangeKind.SNAPSHOT ? "snapshot" : "change",
        change: enumName(IncidentChangeKindSchema, kind),
        incident: incident?.id ?? "",
        status: enumName(IncidentStatusSchema, incident?.status ?? 0),
        entry: entry ? enumName(TimelineEntryKindSchema, entry.kind) : "",
        subject: entry?.subject ?? "",
        cursor,
      };
    }
    case "snapshotComplete":
      return { phase, kind: "snapshot_complete", itemCount: item.value.itemCount, cursor };
    case "heartbeat":
      return { phase, kind: "heartbeat", cursor };
    default:
      return { phase, kind: "unknown", cursor };
  }
}

/**
 * Watches from `afterCursor` (empty: with a snapshot), reporting every item
 * and, after the snapshot, `ready` with the response headers a browser
 * depends on. Closes the stream after `stopAfter` changes (not snapshot
 * items); a stream the server ends first is reported as `end`. Returns the
 * last change's cursor.
 */
async function watch(phase, afterCursor, stopAfter = Infinity) {
  const abort = new AbortController();
  let headers = new Headers();
  let seen = 0;
  let last = "";
  const stream = client.watchIncidents(
    { options: { afterCursor, heartbeatIntervalSeconds: 1 } },
    {
      headers: { "x-api-key": apiKey, origin: ORIGIN },
      signal: abort.signal,
      onHeader: (h) => {
        headers = h;
      },
    },
  );
  for await (const res of stream) {
    const line = describe(phase, res);
    report(line);
    if (line.kind === "snapshot_complete") {
      report({
        phase,
        kind: "ready",
        contentType: headers.get("content-type"),
        allowOrigin: headers.get("access-control-allow-origin"),
      });
    }
    if (line.kind === "change") {
      last = line.cursor;
      seen += 1;
      if (seen === stopAfter) {
        abort.abort();
        return last;
      }
    }
  }
  report({ phase, kind: "end" });
  return last;
}

/** Resolves when one line arrives on stdin; fails if stdin closes first. */
async function nextStdinLine() {
  const lines = createInterface({ input: process.stdin });
  try {
    const { done } = await lines[Symbol.asyncIterator]().next();
    if (done) {
      throw new Error("stdin closed before the resume signal");
    }
  } finally {
    lines.close();
  }
}

async function main() {
  try {
    for await (const res of client.watchIncidents({}, { headers: { origin: ORIGIN } })) {
      report(describe("no_key", res));
      break;
    }
  } catch (err) {
    report({ phase: "no_key", kind: "error", code: Code[ConnectError.from(err).code] });
  }

  const cursor = await watch("live", "", liveChanges);
  report({ kind: "disconnected", cursor });
  await nextStdinLine();
  await watch("resumed", cursor);
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
