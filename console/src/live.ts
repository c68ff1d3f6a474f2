// One live stream: opens a server stream, tells live / stale / reconnecting,
// treats two missed heartbeats as a dead stream, and reconnects with
// exponential backoff (with jitter) from where it left off. What "where it
// left off" means (a cursor, a revision) is the screen's business: `open`
// is called again on every attempt and reads it from the screen's state.
//
// grpc-web cannot ping (browsers send no HTTP/2 PING), so the server's
// heartbeats are the only proof of life: we ask for one every
// HEARTBEAT_SECONDS and declare the stream dead after two intervals of
// silence (plus slack).
import { Code, ConnectError } from "@connectrpc/connect";

export const HEARTBEAT_SECONDS = 5;
/** No message for this long: the stream is stale (one heartbeat missed). */
const STALE_MS = HEARTBEAT_SECONDS * 1000 + 1500;
/** No message for this long: two heartbeats missed, the stream is dead. */
const DEAD_MS = 2 * HEARTBEAT_SECONDS * 1000 + 1500;
const BACKOFF_FIRST_MS = 250;
const BACKOFF_MAX_MS = 8000;

export type LiveState = "connecting" | "live" | "stale" | "reconnecting" | "failed";

export interface LiveSpec<T> {
  /** Opens the stream; `onHeader` must be passed to the call options. */
  open(signal: AbortSignal, onHeader: () => void): AsyncIterable<T>;
  /** Handles one message (heartbeats included). */
  onMessage(msg: T): void;
  /** Called once the stream is established, before its first message. */
  onOpen?(): void | Promise<void>;
  /** An error that a reconnect cannot fix in the same way: the screen
   * resets its position (e.g. a cursor older than the server keeps) and
   * the next attempt starts from a fresh snapshot. Return true if handled. */
  onResetNeeded?(err: ConnectError): boolean;
}

export class Live<T> {
  state: LiveState = "connecting";
  error = "";
  /** Successful (re)connections so far. */
  connections = 0;
  private stopped = false;
  private abort: AbortController | null = null;
  private lastMessage = 0;
  private timer: ReturnType<typeof setInterval> | null = null;

  constructor(
    private readonly spec: LiveSpec<T>,
    private readonly onState: (s: LiveState, error: string) => void,
  ) {}

  start(): this {
    void this.run();
    this.timer = setInterval(() => this.watchdog(), 500);
    return this;
  }

  stop(): void {
    this.stopped = true;
    this.abort?.abort();
    if (this.timer) clearInterval(this.timer);
  }

  private set(state: LiveState, error = ""): void {
    if (this.state === state && this.error === error) return;
    this.state = state;
    this.error = error;
    this.onState(state, error);
  }

  private watchdog(): void {
    if (this.state !== "live" && this.state !== "stale") return;
    const silent = Date.now() - this.lastMessage;
    if (silent > DEAD_MS) {
      // Two heartbeats missed: the stream is dead even if nothing said so
      // (a proxy that dropped it without a FIN). Abort and reconnect.
      this.abort?.abort();
    } else if (silent > STALE_MS) {
      this.set("stale");
    }
  }

  private async run(): Promise<void> {
    let attempt = 0;
    while (!this.stopped) {
      const abort = new AbortController();
      this.abort = abort;
      try {
        const established = () => {
          // Response headers: the server accepted the stream (a watch with
          // nothing to send says nothing else until its first heartbeat).
          this.lastMessage = Date.now();
          this.connections++;
          this.set("live");
          void this.spec.onOpen?.();
        };
        let open = false;
        const stream = this.spec.open(abort.signal, () => {
          open = true;
          established();
        });
        for await (const msg of stream) {
          if (!open) {
            open = true;
            established();
          }
          this.lastMessage = Date.now();
          // A message, not just headers, resets the backoff: a server that
          // accepts streams and ends them at once is not hammered.
          attempt = 0;
          if (this.state !== "live") this.set("live");
          this.spec.onMessage(msg);
        }
        // Ended cleanly: the server is shutting down. Reconnect.
      } catch (e) {
        if (this.stopped) return;
        const err = ConnectError.from(e);
        if (err.code === Code.Unauthenticated || err.code === Code.PermissionDenied || err.code === Code.NotFound) {
          this.set("failed", `${Code[err.code]}: ${err.rawMessage}`);
          return;
        }
        if (
          (err.code === Code.OutOfRange || err.code === Code.InvalidArgument) &&
          this.spec.onResetNeeded?.(err)
        ) {
          attempt = 0;
        }
      }
      if (this.stopped) return;
      this.set("reconnecting");
      const delay = Math.min(BACKOFF_FIRST_MS * 2 ** attempt, BACKOFF_MAX_MS);
      attempt++;
      await sleep(delay / 2 + (Math.random() * delay) / 2);
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
