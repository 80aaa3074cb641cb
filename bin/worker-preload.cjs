// Loaded first in each `keygate serve --workers` worker (`--require`, set by its primary), before
// Node's cluster bootstrap sends the primary its first message. A send to a primary that has just
// died (SIGKILL, the OOM killer) fails with EPIPE as an 'error' on cluster.worker: unheard, it ended
// the worker with Node's "Unhandled 'error' event" and a stack trace on the service's stderr (found
// by a crash stress: a replacement starting as its primary was killed). Node's bootstrap sends
// before any module of keygate's runs, hence this file, in CommonJS: an `--import` runs too late.
// Such a failure (the channel gone: EPIPE, ECONNRESET, ERR_IPC_CHANNEL_CLOSED) is dropped: the
// channel's end follows, on which Node's cluster ends the worker, as it ends every worker of a gone
// primary. Any other error is thrown, as unheard it was.
const GONE = new Set(['EPIPE', 'ECONNRESET', 'ERR_IPC_CHANNEL_CLOSED'])
require('node:cluster').worker?.on('error', (err) => {
  if (!GONE.has(err?.code)) throw err
})
