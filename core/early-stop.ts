// A stop signalled to `serve` before its own handler is there (while its modules load, about half
// a second). As PID 1, a container's entrypoint, a signal with no handler is ignored, not fatal:
// such a SIGTERM was lost, and the platform waited its whole grace period for the SIGKILL (found by
// a deployment review). bin/keygate.ts arms this first thing; serve's handler takes the signal
// over and acts on one that came before it. No imports.

let received: NodeJS.Signals | undefined
const record = (signal: NodeJS.Signals) => {
  received ??= signal
}

/** Keeps the first SIGTERM or SIGINT from now until takeEarlyStop. */
export function armEarlyStop(): void {
  process.on('SIGTERM', record)
  process.on('SIGINT', record)
}

/** Stops keeping them, and gives the one that came meanwhile, if any. */
export function takeEarlyStop(): NodeJS.Signals | undefined {
  process.off('SIGTERM', record)
  process.off('SIGINT', record)
  return received
}
