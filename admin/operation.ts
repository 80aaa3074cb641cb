// One admin API operation: its method and path, the schemas of its input and answer, the errors
// it can answer with, and its handler. The route table, request validation and the OpenAPI
// document are all made from the same list of these, so the documentation cannot drift.
import type { Logger } from '../core/log.ts'
import type http from 'node:http'
import type { Static, TObject, TSchema } from '@sinclair/typebox'
import type { AnomalyFeed, AnomalyLog } from '../core/anomalies.ts'
import type { Actor, AuditLog } from '../core/audit.ts'
import type { Db } from '../core/db.ts'
import type { DenyListService } from '../core/deny-list.ts'
import type { ErrorCode } from '../core/errors.ts'
import type { GiteaTokenService } from '../core/integrations/gitea.ts'
import type { N8nKeyService } from '../core/integrations/n8n.ts'
import type { KeyService } from '../core/keys/service.ts'
import type { Lockout } from '../core/lockout.ts'
import type { UsageReports } from '../core/usage.ts'
import type { WebhookService } from '../core/webhooks.ts'

/** What the handlers work with. */
export interface AdminServices {
  db: Db
  keys: KeyService
  audit: AuditLog
  denyList: DenyListService
  /** The process's lockout (the gateway's and the admin API's), and what it counts an address under. */
  lockout: Lockout
  addressKey: (address: string) => string
  usage: UsageReports
  anomalies: AnomalyLog
  /** Every anomaly as it is recorded, by any instance (the SSE stream). */
  anomalyFeed: AnomalyFeed
  webhooks: WebhookService
  /** Writes this process's pending usage counts, so reports include the latest requests. */
  flushUsage(): Promise<void>
  now(): Date
  log: Logger
  gitea: GiteaTokenService
  n8n: N8nKeyService
  /** The open event streams per credential. */
  streams: StreamSlots
  /** Milliseconds between an anomaly stream's heartbeats (admin.stream_heartbeat_s). */
  streamHeartbeatMs: number
}

/**
 * Open event streams per credential (the actor), at most `max` each. Each stream holds a socket,
 * a feed listener and a heartbeat timer for as long as it is open: without a bound, one
 * credential could open them until the process ran out of sockets or memory.
 */
export class StreamSlots {
  readonly max: number
  readonly #open = new Map<string, number>()

  constructor(max: number) {
    this.max = max
  }

  /** Whether all of `actor`'s slots are taken: a `take` now would give none. */
  full(actor: string): boolean {
    return (this.#open.get(actor) ?? 0) >= this.max
  }

  /** A slot for `actor`, with its release (idempotent), or undefined when all of its slots are taken. */
  take(actor: string): (() => void) | undefined {
    if (this.full(actor)) return undefined
    this.#open.set(actor, (this.#open.get(actor) ?? 0) + 1)
    let released = false
    return () => {
      if (released) return
      released = true
      const left = (this.#open.get(actor) ?? 1) - 1
      if (left > 0) this.#open.set(actor, left)
      else this.#open.delete(actor)
    }
  }
}

export interface OperationInput<Q, B> {
  params: Record<string, string>
  query: Q
  body: B
  actor: Actor
  requestId: string
  req: http.IncomingMessage
  /** For a streaming operation, which writes its answer itself. */
  res: http.ServerResponse
  services: AdminServices
}

export interface Operation {
  /** The OpenAPI operationId. */
  id: string
  method: 'GET' | 'POST' | 'PATCH' | 'DELETE'
  /** `/v1/keys/{id}` style; each `{name}` is one path segment. */
  path: string
  tag: string
  summary: string
  description?: string
  query?: TObject
  /**
   * A path parameter's schema where it is more than a non-empty string: in the document, and
   * checked before the handler runs (before, found by a review, the lockout's address was a plain
   * string in the document while its handler checked an address).
   */
  params?: Record<string, TSchema>
  /**
   * A path parameter naming a thing keygate keeps (a key, a webhook): what it is, and the form of
   * the ids keygate makes, for the document only. Not refused by that form, as `params` are: an id
   * of another form names nothing, and is answered the operation's 404 as any unknown id is. Every
   * path parameter has a schema in one or the other (before, found by a review, the ids were
   * undescribed strings in the document).
   */
  ids?: Record<string, TSchema>
  /** Request headers the handler reads itself (Last-Event-ID), for the document: by name as written, each optional. */
  headers?: TObject
  body?: TSchema
  /**
   * For the document, where the body's items are checked by the operation itself (an import's
   * rows, each refused with its own import_invalid problems): `body` with those items' schema.
   * Before (found by a review), the document declared an import's rows as any value.
   */
  documentedBody?: TSchema
  /**
   * A body the operation takes, for the document (the media type's `example`): what Swagger UI's
   * "Try it out" fills in. Without it, Swagger UI makes one from the schema, which the API refused
   * (text drawn from the name patterns, `"string"` for an address, a URL of random punctuation).
   */
  bodyExample?: Record<string, unknown>
  /** Whether a request without a body is refused (the body schema then sees `{}`). */
  bodyRequired?: boolean
  /**
   * This operation's own body limit in bytes, where its largest valid body is larger than
   * admin.max_body_bytes (the larger of the two applies; 413 above it, as for any body).
   */
  maxBodyBytes?: number
  response: { status: 200 | 201; description: string; schema: TSchema }
  /**
   * Where what a 201 made is read (`/v1/keys/{id}`, the answer's `id` put in), sent as its
   * `Location`: without one, RFC 9110 §15.3.2 has the 201 name its target URI, the collection.
   */
  created?: string
  /** Another status the operation answers with the same schema, when the handler returns `new OtherStatus(...)` (an add that updated). */
  otherStatus?: { status: 200; description: string }
  /**
   * A Server-Sent Events stream: the handler answers on `res` itself, after the same credential
   * and request checks as every operation; `response.schema` is then the data of each event.
   */
  stream?: true
  /**
   * false: the operation may answer without the store (the lockouts this instance holds in
   * memory; the anomaly stream, which opens on a store that cannot be read), so its answer, with
   * the bootstrap token (checked without the store too), says nothing of the store and ends no
   * logged outage (admin/server.ts's storeBacked). Absent: it asks the store.
   */
  storeBacked?: false
  /** The errors of this operation beyond those every operation can answer (COMMON_ERRORS). */
  errors: readonly ErrorCode[]
  handle(input: OperationInput<any, any>): Promise<unknown>
}

/** A handler's answer with the operation's `otherStatus` instead of its `response.status`. */
export class OtherStatus {
  readonly body: unknown
  constructor(body: unknown) {
    this.body = body
  }
}

/**
 * Every admin operation can answer these: credentials, lockout, request framing, faults, and a
 * query parameter it does not take (validation_failed, even on an operation that takes none);
 * and the listener's own, before any operation is chosen: a Host it does not answer to, headers
 * too large, a request not received in time (before, the document named none of these three),
 * an Expect other than 100-continue, a transfer coding other than chunked, an HTTP version
 * other than 1 (core/framing.ts; before, found by a review, the listener answered the last two as
 * any request, and the document named neither).
 */
export const COMMON_ERRORS: readonly ErrorCode[] = [
  'bad_request',
  'host_not_allowed',
  'headers_too_large',
  'request_timeout',
  'expectation_failed',
  'transfer_coding_not_supported',
  'version_not_supported',
  'validation_failed',
  'unauthorized',
  'forbidden',
  'payload_too_large',
  'unsupported_media_type',
  'ip_locked_out',
  'internal_error',
  'store_unavailable',
]

/** Types the handler from the schemas. */
export function defineOperation<Q extends TObject = TObject, B extends TSchema = TSchema>(
  op: Omit<Operation, 'handle' | 'query' | 'body'> & { query?: Q; body?: B; handle(input: OperationInput<Static<Q>, Static<B>>): Promise<unknown> },
): Operation {
  return op as Operation
}
