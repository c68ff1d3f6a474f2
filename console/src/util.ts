// Formatting shared by the screens.
import { timestampDate, timestampFromDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { EntityKind, Severity, type Entity } from "./gen/picket/v1/common_pb.js";

export function ms(t: Timestamp | undefined): number {
  return t ? timestampDate(t).getTime() : 0;
}

export function ts(date: Date): Timestamp {
  return timestampFromDate(date);
}

/** "12 s", "4 min", "3 h", "2 d". */
export function age(t: Timestamp | undefined, now: number): string {
  if (!t) return "";
  return span(Math.max(0, now - ms(t)) / 1000);
}

export function span(seconds: number): string {
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h`;
  return `${Math.floor(seconds / 86400)} d`;
}

export function when(t: Timestamp | undefined): string {
  if (!t) return "";
  return timestampDate(t).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

/** The name of an enum value without its prefix, lower case: SEVERITY_HIGH → high. */
export function enumText(names: Record<number, string>, value: number, prefix: string): string {
  const name = names[value] ?? String(value);
  return name.startsWith(prefix) ? name.slice(prefix.length).toLowerCase().replace(/_/g, " ") : name.toLowerCase();
}

export const severityNames = ["unspecified", "info", "low", "medium", "high", "critical"];

export function severity(s: Severity): string {
  return severityNames[s] ?? String(s);
}

export function entity(e: Entity): string {
  const kind = ({ [EntityKind.ACTOR]: "actor", [EntityKind.IP]: "ip", [EntityKind.SERVICE]: "service", [EntityKind.HOST]: "host", [EntityKind.RESOURCE]: "resource" } as Record<number, string>)[e.kind] ?? "?";
  return `${kind}:${e.value}`;
}
