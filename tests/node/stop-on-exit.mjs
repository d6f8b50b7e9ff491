// Stopping what a test file started, however the file ends. Used by tests/node/harness.mjs and by
// the console's browser tests (frontend/console/test/topology.mjs); it imports nothing outside
// Node, so either can load it without the other's packages.

const stops = new Set();

/**
 * Registers `stop`, a synchronous function that stops something this process started, to run if
 * the process exits or is told to stop (SIGINT, SIGTERM, SIGHUP) before the returned `forget()`
 * is called. A test's own cleanup (`t.after`, `after`) stops things in the ordinary way; this is
 * for an interrupted run, or a test file that crashed, so nothing it started outlives it.
 */
export function stopOnExit(stop) {
  stops.add(stop);
  return () => stops.delete(stop);
}

function stopEverything() {
  for (const stop of [...stops]) {
    stops.delete(stop);
    try {
      stop();
    } catch (error) {
      process.stderr.write(`stopping on exit failed: ${error}\n`);
    }
  }
}

process.once("exit", stopEverything);
for (const [signal, number] of [["SIGINT", 2], ["SIGTERM", 15], ["SIGHUP", 1]]) {
  process.once(signal, () => {
    process.stderr.write(`${signal}: stopping what this test file started\n`);
    stopEverything();
    process.exit(128 + number);
  });
}
