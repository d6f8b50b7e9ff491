// Bundles src/main.ts into dist/app.js and copies the static files (index.html, style.css) next to it.
import { build } from "esbuild";
import { cp, mkdir, rm } from "node:fs/promises";

const here = new URL(".", import.meta.url);
const dist = new URL("dist/", here);

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
await build({
  entryPoints: [new URL("src/main.ts", here).pathname],
  outfile: new URL("app.js", dist).pathname,
  bundle: true,
  format: "esm",
  target: "es2020",
  platform: "browser",
  sourcemap: true,
  minify: process.env.MINIFY === "1",
  logLevel: "warning",
});
await cp(new URL("static/", here), dist, { recursive: true });
console.log(`console: built ${dist.pathname}`);
