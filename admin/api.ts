// Turns the operation table into admin routes. Per request, in this order: lockout check and
// credential (admin/auth.ts), request body (JSON only, size-limited, parsed, no member named
// twice in an object), query and body validated against the operation's schemas (the bad fields
// named, up to 20), then the handler; its result is answered with the operation's status. A
// refusal before the body is read answers with `Connection: close` instead of draining the body.
import type http from 'node:http'
import { isUtf8 } from 'node:buffer'
import { MIMEType } from 'node:util'
import { Type, type TObject } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { fieldInvalid, isKeygateError, type KeygateError } from '../core/errors.ts'
import { expectsContinue, hasBody } from '../core/http.ts'
import { otherWork } from '../core/slices.ts'
import { assertValid, jsonFault, MAX_JSON_DEPTH, refuseChangedNumbers, refuseMemberProblems, shownField, showValue, validationFailed, type FieldProblem } from '../core/validate.ts'
import type { Authenticate } from './auth.ts'
import { OtherStatus, type AdminServices, type Operation } from './operation.ts'
import { AdminError, sendJson, type AdminRequest, type AdminRoute } from './server.ts'

export interface AdminApiOptions {
  operations: readonly Operation[]
  services: AdminServices
  authenticate: Authenticate
  maxBodyBytes: number
}

function isEmptyObject(value: unknown): boolean {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && Object.keys(value).length === 0
}

const JSON_TYPE = /^application\/(?:[\w.+-]+\+)?json\s*(?:;|$)/i

/** A text of JSON's whitespace alone (space, tab, line feed, carriage return), or none. */
const JSON_WHITESPACE_ONLY = /^[ \t\n\r]*$/
/**
 * JSON media types whose bodies mean operations, not the document itself: a PATCH sent as a
 * JSON Merge Patch (RFC 7396) was read as a plain body, `{"metadata":{"env":null}}` replacing the
 * metadata with `{"env":null}` where the sender meant to remove one member (found by a review).
 */
const PATCH_DOCUMENT_TYPE = /^application\/(?:merge-patch|json-patch)\+json\s*(?:;|$)/i
/**
 * The `charset` parameter of a Content-Type, read as browsers and fetch read it (util.MIMEType,
 * WHATWG's MIME parsing): a quoted value may hold `;charset=`, which is no parameter of its own
 * (a pattern looking for `;charset=` anywhere took `foo="a;charset=utf-16"; charset=utf-8` for
 * UTF-16, and refused it, found by a review); the first of two wins.
 */
function charsetOf(contentType: string): string | undefined {
  try {
    return new MIMEType(contentType).params.get('charset') ?? undefined
  } catch {
    return undefined
  }
}

/** The content coding a Content-Encoding names other than `identity` (none), the first of several. */
function contentCoding(header: string | undefined): string | undefined {
  return header?.split(',').map((c) => c.trim()).find((c) => c !== '' && c.toLowerCase() !== 'identity')
}

/**
 * Bodies are UTF-8 (RFC 8259), and one that is not is refused: Buffer's decoding made each bad
 * byte U+FFFD, stored without a word (`k\xff` became the name "k\ufffd"). A byte order mark is
 * kept, so such a body is not JSON, as before.
 */
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/**
 * An authenticated request whose declared body is too large is still read, and dropped, up to
 * this size, so that its client reads the answer; a larger one closes the connection at once.
 */
const DRAIN_MAX_BYTES = 16 * 1024 * 1024

/** A body past this many characters is checked in passes with other work let through between them (otherWork). */
const LARGE_BODY_CHARS = 1024 * 1024

/** Reads the body up to `max` bytes (`limit` names where that comes from); undefined when there is none. */
async function readJson({ req, res }: AdminRequest, max: number, limit: string): Promise<unknown> {
  if (!hasBody(req.headers)) return undefined
  if (!JSON_TYPE.test(req.headers['content-type'] ?? '')) {
    throw new AdminError('unsupported_media_type', `the body must be JSON (Content-Type: application/json), not ${JSON.stringify(req.headers['content-type'] ?? 'none')}`, { connection: 'close' })
  }
  if (PATCH_DOCUMENT_TYPE.test(req.headers['content-type'] ?? '')) {
    throw new AdminError('unsupported_media_type', `the body must be plain JSON (Content-Type: application/json), not a patch document (${showValue(req.headers['content-type'] ?? '')}): a PATCH body names the fields to set, and replaces each whole (metadata too)`, { connection: 'close' })
  }
  const named = charsetOf(req.headers['content-type'] ?? '')
  // US-ASCII is UTF-8's first 128 characters: such a body reads the same (found by a review).
  if (named !== undefined && !/^(utf-?8|us-ascii)$/i.test(named)) {
    throw new AdminError('unsupported_media_type', `the body must be JSON in UTF-8, not charset ${showValue(named)}`, { connection: 'close' })
  }
  const coding = contentCoding(req.headers['content-encoding'])
  if (coding !== undefined) {
    // RFC 9110 §15.5.16 and §12.5.3: a content coding the server does not take is a 415 that lists
    // what it takes in Accept-Encoding. Before (found by a review), the header was ignored: JSON
    // sent as `br` was taken, and a gzipped body refused as "not valid UTF-8".
    throw new AdminError('unsupported_media_type', `the body must be sent as is, not content-coded (Content-Encoding: ${showValue(coding)})`, { 'accept-encoding': 'identity', connection: 'close' })
  }
  const tooLarge = (close = true) => new AdminError('payload_too_large', `the body is larger than ${max} bytes (${limit})`, close ? { connection: 'close' } : {})
  const declared = Number(req.headers['content-length'] ?? 0)
  if (declared > max) {
    // A client waiting for a 100 Continue has sent nothing to drain, and is refused before it does.
    if (declared > DRAIN_MAX_BYTES || expectsContinue(req)) throw tooLarge()
    // Read to its end and dropped (Node does that for a body left unread once the answer is
    // sent), so that the client, still sending, reads the 413: closing at once failed its send
    // first, and `api-key import` of a large file said the admin API could not be reached (EPIPE).
    req.resume()
    throw tooLarge(false)
  }
  if (expectsContinue(req)) res.writeContinue()
  const bytes = await readBody(req, max, tooLarge)
  let text: string
  try {
    text = UTF8.decode(bytes)
  } catch {
    throw new AdminError('bad_request', 'the body is not valid UTF-8')
  }
  // Empty, or JSON's own whitespace alone (RFC 8259 §2), is no body. Not String#trim's: it takes a
  // byte order mark and every Unicode space too, and before (found by a review) a body of "\ufeff"
  // or a no-break space was read as none, and the revoke it came with went ahead.
  if (JSON_WHITESPACE_ONLY.test(text)) return undefined
  // Each pass over a large body (an import's 30 MB) takes tens of milliseconds: the gateway's
  // requests, where one process serves both listeners, are let through between them.
  const large = text.length > LARGE_BODY_CHARS
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch (err) {
    if (large) await otherWork()
    // Where and why, quoting none of the body: the parser's message quoted some ten characters
    // of it either side of an unexpected character, a piece of a key or secret sent to
    // /v1/keys/validate, say, and named no position (found by a review).
    // A byte order mark, which no editor shows, by name (before, found by a review, "Unexpected
    // token" at column 1); RFC 8259 §8.1 has JSON sent over a network start without one.
    if (text.charCodeAt(0) === 0xfeff) throw new AdminError('bad_request', 'the body is not valid JSON (at line 1, column 1: a byte order mark (U+FEFF), which JSON sent over a network does not start with (RFC 8259 §8.1); send the body without it)')
    const { why, at } = jsonFault(text, (err as Error).message)
    throw new AdminError('bad_request', `the body is not valid JSON (${at === undefined ? '' : `at line ${at.line}, column ${at.column}: `}${why})`)
  }
  if (large) await otherWork()
  // First: the walks over the parsed value below take tens of seconds over an object of millions of members.
  refuseMemberProblems(text)
  if (large) await otherWork()
  const problem = jsonProblem(value, 0)
  if (problem !== undefined) throw new AdminError('bad_request', `the body ${problem}`)
  if (large) await otherWork()
  refuseChangedNumbers(text, value)
  // The operation's schema is checked next, another walk over the whole body.
  if (large) await otherWork()
  return value
}

/**
 * The body's bytes, refused with `tooLarge()` once past `max`. The rest is then left unread: the
 * answer closes the connection and drops it (closeWhenAnswered). Before, a `for await` over the
 * request destroyed it, and the socket with it, when the loop threw: the 413 of a body counted past
 * the limit (chunked) was never sent, and the client got a reset.
 */
function readBody(req: http.IncomingMessage, max: number, tooLarge: () => AdminError): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let size = 0
    const stop = (): void => {
      req.off('data', onData).off('end', onEnd).off('error', onError).off('close', onClose)
    }
    const onData = (chunk: Buffer): void => {
      size += chunk.length
      if (size <= max) return void chunks.push(chunk)
      stop()
      req.pause()
      reject(tooLarge())
    }
    const onEnd = (): void => {
      stop()
      resolve(Buffer.concat(chunks))
    }
    // The client went away mid-body, or sent a chunked body that does not parse: its mistake, not
    // a server failure (before, an error-level log line each, and a 500).
    const onError = (err: Error): void => {
      stop()
      reject(new AdminError('bad_request', `the body did not arrive whole: ${err.message}`, { connection: 'close' }))
    }
    const onClose = (): void => onError(new Error('the connection closed'))
    req.on('data', onData).on('end', onEnd).on('error', onError).on('close', onClose)
  })
}

const HOLDS_NUL = 'holds a NUL character (\\u0000), which no field takes'

/** What no operation can take in a parsed body: nesting past MAX_JSON_DEPTH, or a NUL character (PostgreSQL text cannot hold one). */
function jsonProblem(value: unknown, depth: number): string | undefined {
  if (typeof value === 'string') return value.includes('\u0000') ? HOLDS_NUL : undefined
  if (typeof value !== 'object' || value === null) return undefined
  if (depth >= MAX_JSON_DEPTH) return `nests deeper than ${MAX_JSON_DEPTH} levels`
  // An array by its indexes: no entry pair and index string per element (a body of 480,000 numbers).
  if (Array.isArray(value)) {
    for (const v of value) {
      const p = jsonProblem(v, depth + 1)
      if (p !== undefined) return p
    }
    return undefined
  }
  for (const k of Object.keys(value)) {
    const p = k.includes('\u0000') ? HOLDS_NUL : jsonProblem((value as Record<string, unknown>)[k], depth + 1)
    if (p !== undefined) return p
  }
  return undefined
}

/**
 * The query parameters whose percent-escapes decode to bytes that are not UTF-8 (`%ff`, an
 * overlong `%C0%AE`), by name as URLSearchParams reads it: it reads each such byte as U+FFFD, and
 * before (found by a review) `name=%ff` searched for "\ufffd" and answered 200, where a path
 * holding the same bytes is refused.
 */
function notUtf8Parameters(search: string): Set<string> {
  const names = new Set<string>()
  if (!/%[89a-f]/i.test(search)) return names
  for (const pair of search.slice(1).split('&')) {
    const bytes = pair.replace(/%[0-9a-f]{2}/gi, (e) => String.fromCharCode(parseInt(e.slice(1), 16)))
    if (!isUtf8(Buffer.from(bytes, 'latin1'))) names.add(new URLSearchParams(pair).keys().next().value ?? '')
  }
  return names
}

/** What is wrong with query parameter `name` given as `all` before its schema is checked, if anything. */
function parameterProblem(name: string, all: readonly string[], type: unknown, notUtf8: ReadonlySet<string>): string | undefined {
  if (notUtf8.has(name)) return 'is not UTF-8 once percent-decoded: send each character percent-encoded as UTF-8'
  if (all.length > 1) return 'is given more than once'
  const value = all[0] as string
  if (name.includes('\u0000') || value.includes('\u0000')) return 'holds a NUL character'
  // Whole numbers only: conversion would read `1e2` as 1 and `2.9` as 2.
  if (type === 'integer' && !/^-?[0-9]+$/.test(value)) return `${showValue(value)} is not a whole number`
  // `true` or `false` as written: conversion would read `1`, `0` and `TRUE` too.
  if (type === 'boolean' && value !== 'true' && value !== 'false') return `${showValue(value)} is not allowed; expected true or false`
  return undefined
}

/**
 * A query's parameters by name, each name once in the order first given, with all its values in
 * order: what `new Set(params.keys())` and `params.getAll(name)` for each give, in one walk. Before
 * (found by a review), getAll walked every parameter for each name: a query of n distinct names,
 * which any admin credential may send, cost n²: the 4,354 names of one to three characters that fit
 * in the default 16 KiB head held the admin listener 162 ms, 64,000 within a head of 1 MiB 29 s
 * (bench/admin-query.ts).
 */
export function parametersByName(params: URLSearchParams): Map<string, string[]> {
  const out = new Map<string, string[]>()
  for (const [name, value] of params) {
    const all = out.get(name)
    if (all === undefined) out.set(name, [value])
    else all.push(value)
  }
  return out
}

/**
 * Query parameters as the schema's types (strings to numbers and booleans), each given once.
 * Every bad one is named in `checks`, to be answered with the body's in one refusal (before, found
 * by a review, one that was no whole number, repeated or not UTF-8 was refused by itself, the
 * others named only once it was corrected).
 */
function readQuery(url: URL, schema: TObject | undefined, checks: FieldChecks): unknown {
  const notUtf8 = notUtf8Parameters(url.search)
  const raw: Record<string, string> = {}
  // A name the client chose is shown as an unknown one is, cut past 120 characters (before, found
  // by a review, a repeated one, or one with a NUL or a byte that is not UTF-8, was shown whole).
  for (const [name, all] of parametersByName(url.searchParams)) {
    const problem = parameterProblem(name, all, (schema?.properties[name] as { type?: unknown } | undefined)?.type, notUtf8)
    if (problem !== undefined) checks.add(shownField(name), problem)
    // An own property even for `__proto__`, so that it is refused as unknown rather than ignored.
    else Object.defineProperty(raw, name, { value: all[0], enumerable: true, writable: true, configurable: true })
  }
  // Named as query parameters, with those allowed (before, found by a review, "unknown key", the
  // configuration file's word, which on /v1/keys reads as an API key, `type[]` was cut to
  // `type...` as a YAML key holding a secret would be, and an operation without a query named
  // none it takes).
  const known = Object.keys(schema?.properties ?? {})
  for (const name of Object.keys(raw).filter((n) => !known.includes(n))) {
    checks.add(shownField(name), known.length > 0 ? `unknown query parameter; allowed here: ${known.join(', ')}` : 'unknown query parameter; this operation takes none')
    delete raw[name]
  }
  return schema ? checks.run(() => assertValid(schema, Value.Convert(schema, raw), 'query')) : {}
}

/**
 * Checks run one after another, each `validation_failed` kept to be answered with the others as
 * one (every bad field named, up to MAX_LISTED_PROBLEMS); any other refusal is thrown at once.
 */
class FieldChecks {
  readonly #fields: FieldProblem[] = []
  #more = false
  /** The one refusal caught, while it is the only problem: answered as it is. */
  #only: KeygateError | undefined

  add(field: string, message: string): void {
    this.#only = undefined
    this.#fields.push({ field, message })
  }

  run<T>(check: () => T): T | undefined {
    try {
      return check()
    } catch (err) {
      const fields = isKeygateError(err, 'validation_failed') ? (err.details?.fields as FieldProblem[] | undefined) : undefined
      if (fields === undefined) throw err
      this.#only = this.#fields.length === 0 ? (err as KeygateError) : undefined
      this.#fields.push(...fields)
      this.#more ||= (err as KeygateError).details?.more === true
      return undefined
    }
  }

  /** Throws what the checks found, if anything. */
  done(): void {
    if (this.#only !== undefined) throw this.#only
    if (this.#fields.length > 0) throw validationFailed(this.#fields, this.#more)
  }
}

/** The Location of what `op` made, from the `id` of its answer `result`; none for an operation that makes nothing addressable. */
function createdAt(op: Operation, result: unknown): http.OutgoingHttpHeaders {
  const id = (result as { id?: unknown } | null)?.id
  return op.created !== undefined && typeof id === 'string' ? { location: op.created.replace('{id}', encodeURIComponent(id)) } : {}
}

/** The most bytes `op` reads of a body, and what sets it: its own limit where that is larger than admin.max_body_bytes. */
function bodyLimit(op: Operation, maxBodyBytes: number): [number, string] {
  return op.maxBodyBytes !== undefined && op.maxBodyBytes > maxBodyBytes ? [op.maxBodyBytes, `the limit of ${op.method} ${op.path}`] : [maxBodyBytes, 'admin.max_body_bytes']
}

export function adminApiRoutes(options: AdminApiOptions): AdminRoute[] {
  const { services, authenticate, maxBodyBytes } = options
  return options.operations.map((op) => {
    // The path parameters' own schemas, where an operation gives them: checked as the document
    // shows them (before, found by a review, they were the document's alone).
    const paramsSchema = op.params ? Type.Object(op.params) : undefined
    return {
      method: op.method,
      path: op.path,
      readsBody: true,
      // Before (found by a review), every operation, GET /v1/lockouts too, which the bootstrap
      // token reaches without the store: it ended a logged outage while the store was still down.
      ...(op.storeBacked === false ? {} : { storeBacked: true as const }),
      async handle(ctx: AdminRequest) {
        const actor = await authenticate(ctx.req.headers.authorization, ctx.req.socket.remoteAddress).catch((err: unknown) => {
          // Refused before the body is read: close instead of draining what may be a large body.
          // Its cause kept, for the log line of a 503 (admin/server.ts).
          if (hasBody(ctx.req.headers) && isKeygateError(err)) throw new AdminError(err.code, err.message, { ...(err instanceof AdminError ? err.headers : {}), connection: 'close' }, err.details as Record<string, unknown> | undefined, err.cause === undefined ? undefined : { cause: err.cause })
          throw err
        })
        const parsed = await readJson(ctx, ...bodyLimit(op, maxBodyBytes))
        // An empty object is no body: generic clients send `{}` with every POST or DELETE (before,
        // found by a review: refused 400 on the operations that take none).
        if (parsed !== undefined && !op.body && !isEmptyObject(parsed)) throw new AdminError('bad_request', `${op.method} ${op.path} takes no body (or an empty object)`)
        if (parsed === undefined && op.body && op.bodyRequired !== false) {
          // The field's words as the message's, as for every other field (before, found by a review, "is required" alone).
          throw new AdminError('validation_failed', 'body: is required; expected a JSON object', {}, { fields: [{ field: 'body', message: 'is required; expected a JSON object' }] })
        }
        // The body's bad fields and the bad query parameters named in one answer (before, found by
        // a review, the query's only once the body was corrected).
        const checks = new FieldChecks()
        if (paramsSchema) checks.run(() => assertValid(paramsSchema, ctx.params))
        // No body is `{}` where every field is optional; a body of JSON `null` is no object, refused
        // as `[]` is (before, found by a review: read as `{}`, it revoked or rotated the key).
        const bodySchema = op.body
        const body = bodySchema ? checks.run(() => assertValid(bodySchema, parsed === undefined ? {} : parsed)) : undefined
        const query = readQuery(ctx.url, op.query, checks)
        checks.done()
        const result = await op.handle({ params: ctx.params, query, body, actor, requestId: ctx.requestId, req: ctx.req, res: ctx.res, services })
        if (op.stream) return
        if (result instanceof OtherStatus && op.otherStatus) sendJson(ctx.res, op.otherStatus.status, result.body, { 'x-request-id': ctx.requestId })
        else sendJson(ctx.res, op.response.status, result, { 'x-request-id': ctx.requestId, ...createdAt(op, result) })
      },
    }
  })
}
