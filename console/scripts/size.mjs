// Prints the gzip size of what the console loads at start (index.html and
// every asset it references), so docs/PERFORMANCE.md can quote it and a
// regression past the 300 KB budget fails the build.
import { readFileSync, readdirSync } from "node:fs";
import { gzipSync } from "node:zlib";

const BUDGET = 300 * 1024;
const html = readFileSync("dist/index.html", "utf8");
const referenced = [...html.matchAll(/(?:src|href)="\/(assets\/[^"]+)"/g)].map((m) => m[1]);
let js = 0;
let total = gzipSync(html, { level: 9 }).length;
for (const file of referenced) {
  const size = gzipSync(readFileSync(`dist/${file}`), { level: 9 }).length;
  total += size;
  if (file.endsWith(".js")) js += size;
  console.log(`${file}: ${(size / 1024).toFixed(1)} KiB gzip`);
}
const all = readdirSync("dist/assets").length;
console.log(`initial load: ${(total / 1024).toFixed(1)} KiB gzip (JavaScript ${(js / 1024).toFixed(1)} KiB); ${all} asset files`);
if (js > BUDGET) {
  console.error(`initial JavaScript is over the ${BUDGET / 1024} KiB gzip budget`);
  process.exit(1);
}
