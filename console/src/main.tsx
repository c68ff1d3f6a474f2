// Entry point: the key form, the navigation (hash routes; the key is never
// in the URL) and the screens the key's scopes allow.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, errorText, forgetKey, identityOf, storedKey, storeKey, type Identity } from "./api.js";
import { Alerts } from "./screens/alerts.js";
import { Approvals } from "./screens/approvals.js";
import { Audit } from "./screens/audit.js";
import { Dashboard } from "./screens/dashboard.js";
import { Decisions } from "./screens/decisions.js";
import { Incident } from "./screens/incident.js";
import { Incidents } from "./screens/incidents.js";
import "./style.css";

const screens: [string, string][] = [
  ["alerts", "Alerts"],
  ["incidents", "Incidents"],
  ["approvals", "Approvals"],
  ["decisions", "Decisions"],
  ["dashboard", "Dashboard"],
  ["audit", "Audit log"],
];

function useRoute(): string[] {
  const read = () => (location.hash.replace(/^#\/?/, "") || "alerts").split("/");
  const [route, setRoute] = useState(read);
  useEffect(() => {
    const on = () => setRoute(read());
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  return route;
}

function App() {
  const [me, setMe] = useState<Identity | null>(null);
  const [checking, setChecking] = useState(Boolean(storedKey()));
  const [error, setError] = useState("");
  const route = useRoute();

  const check = async () => {
    setChecking(true);
    try {
      setMe(identityOf(await api.admin.whoAmI({})));
      setError("");
    } catch (e) {
      forgetKey();
      setMe(null);
      setError(errorText(e));
    } finally {
      setChecking(false);
    }
  };
  useEffect(() => {
    if (storedKey()) void check();
  }, []);

  if (!me) {
    return (
      <main class="login">
        <h1>Picket</h1>
        <form
          id="key-form"
          onSubmit={(e) => {
            e.preventDefault();
            const input = (e.currentTarget.elements.namedItem("key") as HTMLInputElement).value.trim();
            if (!input) return;
            storeKey(input);
            void check();
          }}
        >
          <label>
            API key <input id="api-key" name="key" type="password" autocomplete="off" spellcheck={false} />
          </label>
          <button type="submit" disabled={checking}>
            Open console
          </button>
          <p class="hint">The key stays in this tab (sessionStorage) and is sent only to this server.</p>
          {error ? <p class="error" role="alert">{error}</p> : null}
        </form>
      </main>
    );
  }

  const [screen, arg] = route;
  let body;
  if (!me.read) body = <p class="error">This key lacks the read scope: the console has nothing to show.</p>;
  else if (screen === "incident" && arg) body = <Incident id={arg} me={me} key={arg} />;
  else if (screen === "incidents") body = <Incidents />;
  else if (screen === "approvals") body = <Approvals me={me} />;
  else if (screen === "decisions") body = <Decisions me={me} />;
  else if (screen === "dashboard") body = <Dashboard />;
  else if (screen === "audit") body = <Audit />;
  else body = <Alerts me={me} />;

  return (
    <>
      <nav>
        <b>Picket</b>
        {screens.map(([id, name]) => (
          <a href={`#/${id}`} class={screen === id ? "active" : ""} id={`nav-${id}`}>
            {name}
          </a>
        ))}
        <span class="who" id="who" data-respond={String(me.respond)}>
          {me.tenant} · {me.keyId} · {me.respond ? "read, respond" : "read only"}
        </span>
        <button
          id="sign-out"
          onClick={() => {
            forgetKey();
            setMe(null);
          }}
        >
          Sign out
        </button>
      </nav>
      <main>{body}</main>
    </>
  );
}

render(<App />, document.getElementById("app")!);
