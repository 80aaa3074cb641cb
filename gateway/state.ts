// Per-request state (one object, all fields set in the constructor so every request has the
// same shape), the stage signature and what all stages share.
import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http'
import type { Duplex } from 'node:stream'
import type { ErrorCode } from '../core/errors.ts'
import type { Logger } from '../core/log.ts'
import type { GatewayMetrics, GatewayOutcome, RouteMetrics } from '../core/metrics.ts'
import type { UsageSink } from '../core/usage.ts'
import type { CachedKey } from './key-cache.ts'
import type { CompiledRoute, Router } from './route.ts'

/** A stage's verdict: the error code to answer with. `undefined` lets the request go on. */
export type Verdict = ErrorCode & GatewayOutcome
/** What a stage returns to send the request on at once, past the stages after it (a CORS preflight: createPreflightStage). */
export const FORWARD_NOW: unique symbol = Symbol('forward now')
export type StageResult = Verdict | typeof FORWARD_NOW | undefined
export type Stage = (s: RequestState) => StageResult | Promise<StageResult>

/** The path of a request target: up to its query. */
export function pathOf(target: string): string {
  const q = target.indexOf('?')
  return q === -1 ? target : target.slice(0, q)
}

export class RequestState {
  readonly req: IncomingMessage
  /** `req.headers`, read once: Node builds it behind a getter, and every stage reads it. */
  readonly headers: IncomingHttpHeaders
  /** Set for ordinary requests. */
  readonly res: ServerResponse | undefined
  /** Set for upgrade (WebSocket) requests instead of `res`. */
  readonly socket: Duplex | undefined
  readonly head: Buffer | undefined
  readonly start: number
  id: string
  /** Origin-form request target (path and query). */
  target: string
  /**
   * The path's escapes decoded (decodeEscapes), set by the request check when the path holds a
   * `%`: its escapes are checked there, and the route check reads the path leniently from them.
   */
  pathBytes: string | undefined
  /** Client address (normalised) and the bucket it is counted in for limits and lockouts. */
  address: string
  addressKey: string
  /** The socket peer (normalised); differs from `address` behind a trusted proxy. */
  peer: string
  /** The peer is a trusted proxy: its X-Forwarded-* are passed on (extended). */
  peerTrusted: boolean
  presented: string | undefined
  /** Bit set of the key sources that carried the presented key (see key-extract.ts). */
  keySources: number
  key: CachedKey | undefined
  /** The stored key presented and refused (revoked, expired, outside its bindings): for the anomaly detector only, never the answer. */
  refusedKeyId: string | undefined
  route: CompiledRoute | undefined
  /** RateLimit-* to answer with; limit < 0: none. */
  rlLimit: number
  rlRemaining: number
  rlResetS: number
  retryAfterS: number
  /** Message for the error answer instead of the catalogue's. */
  message: string | undefined
  upstreamStart: number
  /** Counted and logged already (respond.ts `record`): every request is, once. */
  recorded: boolean

  constructor(req: IncomingMessage, res: ServerResponse | undefined, socket: Duplex | undefined, head: Buffer | undefined, start: number) {
    this.req = req
    this.headers = req.headers
    this.res = res
    this.socket = socket
    this.head = head
    this.start = start
    this.id = ''
    this.target = req.url ?? '/'
    this.pathBytes = undefined
    this.address = ''
    this.addressKey = ''
    this.peer = ''
    this.peerTrusted = false
    this.presented = undefined
    this.keySources = 0
    this.key = undefined
    this.refusedKeyId = undefined
    this.route = undefined
    this.rlLimit = -1
    this.rlRemaining = 0
    this.rlResetS = 0
    this.retryAfterS = 0
    this.message = undefined
    this.upstreamStart = 0
    this.recorded = false
  }
}

/** What the stages and the responder share, built once per gateway. */
export interface GatewayContext {
  readonly metrics: GatewayMetrics
  /** The metric children of each route, by `CompiledRoute.index`. */
  readonly routeMetrics: readonly RouteMetrics[]
  readonly log: Logger
  readonly router: Router
  readonly accessLog: boolean
  /** A 401's WWW-Authenticate (keyChallenges). */
  readonly challenges: { readonly missing: string; readonly invalid: string }
  /** Per-key usage and rejections for the admin reports (NO_USAGE when not recorded). */
  readonly usage: UsageSink
  /** Milliseconds since the epoch (the injectable clock). */
  readonly now: () => number
  /** Set by shutdown: answers carry `Connection: close`. */
  closing: boolean
  /** Set at the shutdown deadline: the connections ended from then on are the gateway's doing, not their clients'. */
  cut: boolean
}
