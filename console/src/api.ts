// The console's only way to Picket: grpc-web (Connect's transport) to the
// page's own origin, with the API key from sessionStorage as `x-api-key`.
// The key never goes into the URL, localStorage or a cookie.
import { createClient, type Client, type Interceptor, Code, ConnectError } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import type { DescService } from "@bufbuild/protobuf";
import { AdminService, Scope, type WhoAmIResponse } from "./gen/picket/v1/admin_pb.js";
import { AlertService } from "./gen/picket/v1/alert_pb.js";
import { IncidentService } from "./gen/picket/v1/incident_pb.js";
import { PlaybookService } from "./gen/picket/v1/playbook_pb.js";
import { EnforcementService } from "./gen/picket/v1/enforcement_pb.js";
import { ReportService } from "./gen/picket/v1/report_pb.js";
import { IngestService } from "./gen/picket/v1/ingest_pb.js";

const KEY = "picket.apiKey";

export function storedKey(): string {
  return sessionStorage.getItem(KEY) ?? "";
}
export function storeKey(key: string): void {
  sessionStorage.setItem(KEY, key);
}
export function forgetKey(): void {
  sessionStorage.removeItem(KEY);
}

const withKey: Interceptor = (next) => async (req) => {
  const key = storedKey();
  if (key) req.header.set("x-api-key", key);
  return next(req);
};

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  interceptors: [withKey],
});

function client<T extends DescService>(service: T): Client<T> {
  return createClient(service, transport);
}

export const api = {
  admin: client(AdminService),
  alerts: client(AlertService),
  incidents: client(IncidentService),
  playbooks: client(PlaybookService),
  enforcement: client(EnforcementService),
  reports: client(ReportService),
  events: client(IngestService),
};

/** Who the key is, and what it may do. */
export interface Identity {
  keyId: string;
  tenant: string;
  read: boolean;
  respond: boolean;
  admin: boolean;
}

export function identityOf(who: WhoAmIResponse): Identity {
  const has = (s: Scope) => who.operator || who.scopes.includes(s);
  return {
    keyId: who.keyId,
    tenant: who.operator ? "operator" : who.tenantName,
    read: has(Scope.READ),
    respond: has(Scope.RESPOND),
    admin: has(Scope.ADMIN),
  };
}

/** A short, human message for an error (never a stack). */
export function errorText(e: unknown): string {
  const err = ConnectError.from(e);
  return `${Code[err.code] ?? err.code}: ${err.rawMessage}`;
}
