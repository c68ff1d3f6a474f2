// Drives Picket's web console in a real browser (Debian's Chromium through
// playwright-core) for tests/api/console.rs.
//
//   node drive.mjs BASE_URL
//
// Reads one command per line on stdin, a JSON object {"op": …, …}, runs it
// against the page and answers one JSON line on stdout: {"ok": true,
// "value": …} or {"ok": false, "error": …}. The Rust test holds the
// scenario; this file only knows how to touch the page. It exits when stdin
// closes. Anything the page reports as an error (a console error, an
// uncaught exception, a CSP violation) is collected and returned by the
// `problems` command, so the test can require a clean run.

import { createInterface } from "node:readline";
import { existsSync } from "node:fs";
import { chromium } from "playwright-core";

const [baseUrl] = process.argv.slice(2);
if (!baseUrl) {
  console.error("usage: node drive.mjs BASE_URL");
  process.exit(2);
}
const executablePath = process.env.PICKET_CHROMIUM || "/usr/bin/chromium";
if (!existsSync(executablePath)) {
  console.error(`Chromium not found at ${executablePath} (apt-get install chromium, or set PICKET_CHROMIUM)`);
  process.exit(3);
}

const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
});
const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
let page = await context.newPage();
const problems = [];
let loads = 0;
const watch = (p) => {
  p.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  p.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  p.on("load", () => loads++);
};
watch(page);

/** Requests to the API (grpc-web paths) are refused while this is set. */
let blocked = false;
await context.route(/\/picket\.v1\.[A-Za-z]+\/[A-Za-z]+$/, (route) =>
  blocked ? route.abort("connectionrefused") : route.continue(),
);

const T = (t) => t ?? 10_000;

const ops = {
  async goto({ path }) {
    const res = await page.goto(baseUrl + path);
    const headers = await res.allHeaders();
    return { status: res.status(), csp: headers["content-security-policy"] ?? "" };
  },
  async fill({ sel, text }) {
    await page.fill(sel, text);
  },
  async click({ sel, timeout }) {
    await page.click(sel, { timeout: T(timeout) });
  },
  async select({ sel, value }) {
    await page.selectOption(sel, value);
  },
  async wait({ sel, timeout, state }) {
    await page.waitForSelector(sel, { timeout: T(timeout), state: state ?? "visible" });
  },
  /** Waits until `sel` matches exactly `n` elements. */
  async waitCount({ sel, n, timeout }) {
    await page.waitForFunction(
      ([s, n]) => document.querySelectorAll(s).length === n,
      [sel, n],
      { timeout: T(timeout), polling: 20 },
    );
  },
  async count({ sel }) {
    return page.locator(sel).count();
  },
  async texts({ sel }) {
    return page.locator(sel).allTextContents();
  },
  async attrs({ sel, name }) {
    return page.locator(sel).evaluateAll((els, n) => els.map((e) => e.getAttribute(n)), name);
  },
  /** Waits until the live-status badge of `stream` says `state`. */
  async waitState({ stream, state, timeout }) {
    await page.waitForSelector(`[data-stream="${stream}"][data-state="${state}"]`, {
      timeout: T(timeout),
      state: "attached",
    });
  },
  async screenshot({ path }) {
    await page.screenshot({ path, fullPage: true });
  },
  async block({ on }) {
    blocked = on;
  },
  /** Marks the page; `marked` tells whether it is still the same document. */
  async mark() {
    await page.evaluate(() => {
      window.__picketTestMark = true;
    });
  },
  async marked() {
    return page.evaluate(() => window.__picketTestMark === true);
  },
  async loads() {
    return loads;
  },
  /** Where the key is kept: sessionStorage only, never the URL or localStorage. */
  async keyPlaces({ key }) {
    return page.evaluate((k) => ({
      session: Object.values(sessionStorage).includes(k),
      local: Object.values(localStorage).includes(k),
      url: location.href.includes(k),
      cookie: document.cookie.includes(k),
    }), key);
  },
  /** A hand-made grpc-web call from the page with the key it holds:
   * `message` is the request's protobuf encoding as hex. Returns the
   * grpc-status (from the headers, or the trailer frame). */
  async forge({ method, message }) {
    return page.evaluate(async ([method, hex]) => {
      const msg = new Uint8Array(hex.match(/../g)?.map((h) => parseInt(h, 16)) ?? []);
      const body = new Uint8Array(5 + msg.length);
      new DataView(body.buffer).setUint32(1, msg.length);
      body.set(msg, 5);
      const key = sessionStorage.getItem("picket.apiKey") ?? "";
      const res = await fetch(`/${method}`, {
        method: "POST",
        headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1", "x-api-key": key },
        body,
      });
      let status = res.headers.get("grpc-status");
      const text = new TextDecoder().decode(await res.arrayBuffer());
      const m = text.match(/grpc-status:\s*(\d+)/);
      if (status === null && m) status = m[1];
      return { http: res.status, grpcStatus: Number(status) };
    }, [method, message]);
  },
  async problems() {
    return problems;
  },
  /** Runs a small function body in the page (for reading state). */
  async eval({ js }) {
    return page.evaluate(js);
  },
};

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let reply;
  try {
    const cmd = JSON.parse(line);
    const op = ops[cmd.op];
    if (!op) throw new Error(`unknown op ${cmd.op}`);
    reply = { ok: true, value: (await op(cmd)) ?? null };
  } catch (e) {
    reply = { ok: false, error: String(e?.message ?? e) };
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
await browser.close();
