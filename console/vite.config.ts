// Builds the console into dist/, which is committed and embedded in the
// server binary (see ARCHITECTURE.md, "The console"). The build must be
// deterministic: .ci/run rebuilds and fails if dist/ changes. Content hashes
// in file names make every asset cacheable forever; index.html is not hashed.
import { defineConfig } from "vite";

export default defineConfig({
  base: "/",
  oxc: {
    jsx: { runtime: "automatic", importSource: "preact" },
  },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    sourcemap: false,
    // The CSP allows scripts from 'self' only: no inline module-preload
    // polyfill, no data: URLs for small assets.
    modulePreload: { polyfill: false },
    assetsInlineLimit: 0,
    reportCompressedSize: false,
  },
});
