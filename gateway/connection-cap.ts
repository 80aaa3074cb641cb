// The cap on the gateway's client connections (gateway.max_connections). Each client connection
// may hold a connection to an upstream too: without a cap, a client holding open about
// (open-file limit / 2) connections took every file descriptor of the process, and the admin
// listener's health and metrics, the gateway's /healthz, and new connections to the store and
// Redis failed until they ended (found by a review). Node's `server.maxConnections` closes a
// connection past the cap as it is accepted, in net.Server's own accept, and emits 'drop': nothing
// runs per request.
import { readFileSync } from 'node:fs'
import type { Server } from 'node:net'
import { oncePer, type Logger } from '../core/log.ts'
import type { GatewayMetrics } from '../core/metrics.ts'

/** File descriptors left to the rest of the process: the admin listener, the store's pool, Redis, logs and its own files. */
export const RESERVED_FILES = 256

/** How often, at most, refusals at the cap are warned of. */
const WARN_EVERY_MS = 60_000

/**
 * The soft open-file limit of this process as Linux's /proc/self/limits gives it (`Max open
 * files`), after Node raised it to the hard limit as it started; undefined where it cannot be read
 * (not Linux) or is unlimited.
 */
export function openFileLimit(read: () => string = () => readFileSync('/proc/self/limits', 'utf8')): number | undefined {
  let text: string
  try {
    text = read()
  } catch {
    return undefined
  }
  const soft = /^Max open files[ \t]+(\S+)/m.exec(text)?.[1]
  if (soft === undefined || !/^\d+$/.test(soft)) return undefined
  return Number(soft)
}

/** The connections an open-file limit allows: (limit - RESERVED_FILES) / 2, at least 1. */
export function allowedConnections(limit: number): number {
  return Math.max(1, Math.floor((limit - RESERVED_FILES) / 2))
}

/**
 * The cap of gateway.max_connections `configured` under an open-file limit of `limit`: a
 * configured one as given (`over` when the limit allows fewer), else the one the limit allows, or
 * none where there is no limit to derive it from.
 */
export function connectionCap(configured: number, limit: number | undefined): { max: number | undefined; allowed: number | undefined; over: boolean } {
  const allowed = limit === undefined ? undefined : allowedConnections(limit)
  if (configured > 0) return { max: configured, allowed, over: allowed !== undefined && configured > allowed }
  return { max: allowed, allowed, over: false }
}

/**
 * Sets the cap on `server` (a listener of its own: under `--workers` each worker's, against its
 * own limit), counts the connections refused at it, and warns of them at most once a minute.
 * Returns the cap (undefined: none).
 */
export function capConnections(server: Server, options: { configured: number; log: Logger; metrics: GatewayMetrics }): number | undefined {
  const { log, metrics } = options
  const limit = openFileLimit()
  const { max, allowed, over } = connectionCap(options.configured, limit)
  metrics.openConnections = () => new Promise((resolve) => server.getConnections((err, count) => resolve(err ? 0 : count)))
  if (over) {
    log.warn(`gateway.max_connections is ${options.configured}, more than the open-file limit of ${limit} allows (${allowed}: (limit - ${RESERVED_FILES}) / 2, each connection may hold an upstream one): held open, they may take every file descriptor, and the admin listener, the store and Redis fail meanwhile; raise the limit (ulimit -n, LimitNOFILE) or lower the setting`, {
      max_connections: options.configured,
      open_file_limit: limit,
      allowed,
    })
  }
  if (max === undefined) return undefined
  server.maxConnections = max
  metrics.connectionsMax.set(max)
  const warnNow = oncePer(WARN_EVERY_MS)
  let refused = 0
  server.on('drop', () => {
    metrics.connectionsRefused.inc()
    refused++
    if (!warnNow()) return
    log.warn('gateway connections at the cap; new ones are closed unanswered (gateway.max_connections)', { max_connections: max, refused })
    refused = 0
  })
  return max
}
