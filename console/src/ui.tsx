// Small pieces shared by the screens: the live-status badge, a hook that
// runs a Live stream for a component's lifetime, and a ticking clock.
import { useEffect, useState } from "preact/hooks";
import type { ComponentChildren } from "preact";
import { Live, type LiveSpec, type LiveState } from "./live.js";

export function useLive<T>(name: string, make: () => LiveSpec<T>, deps: unknown[]): [LiveState, string] {
  const [state, setState] = useState<[LiveState, string]>(["connecting", ""]);
  useEffect(() => {
    setState(["connecting", ""]);
    const live = new Live(make(), (s, e) => setState([s, e])).start();
    return () => live.stop();
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [name, ...deps]);
  return state;
}

export function Status({ name, state }: { name: string; state: [LiveState, string] }) {
  const [s, error] = state;
  return (
    <span class={`status status-${s}`} data-stream={name} data-state={s} title={error}>
      {s}
      {error ? ` (${error})` : ""}
    </span>
  );
}

/** The current time, refreshed every `everyMs`. */
export function useNow(everyMs = 5000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), everyMs);
    return () => clearInterval(t);
  }, [everyMs]);
  return now;
}

export function Header({ title, children }: { title: string; children?: ComponentChildren }) {
  return (
    <div class="screen-head">
      <h2>{title}</h2>
      {children}
    </div>
  );
}

export function ErrorLine({ error }: { error: string }) {
  return error ? <p class="error" role="alert">{error}</p> : null;
}
