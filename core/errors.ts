// The one error catalogue of keygate: every code the gateway, the admin API and the CLI can
// answer with, its HTTP status and its default message. README.md lists the same table and
// test/errors.test.ts keeps the two in step.
import { holdsKey } from './keys/format.ts'
import { scrub } from './log.ts'
import { shownInput } from './validate.ts'

export const ERRORS = {
  // Gateway request contract (SPEC §3)
  key_missing: { status: 401, message: 'An API key is required.' },
  key_invalid: { status: 401, message: 'The API key is not valid.' },
  key_expired: { status: 401, message: 'The API key has expired.' },
  key_revoked: { status: 401, message: 'The API key has been revoked.' },
  ip_blocked: { status: 403, message: 'Requests from this address are not allowed.' },
  scope_denied: { status: 403, message: 'The API key does not grant access to this route.' },
  route_not_found: { status: 404, message: 'No route matches this request.' },
  rate_limited: { status: 429, message: 'Too many requests.' },
  ip_locked_out: { status: 429, message: 'Too many failed attempts from this address; try again later.' },
  upstream_unavailable: { status: 502, message: 'The upstream service could not be reached.' },
  upstream_timeout: { status: 504, message: 'The upstream service did not answer in time.' },
  store_unavailable: { status: 503, message: 'The key store is not available.' },
  shutting_down: { status: 503, message: 'The gateway is shutting down; try again.' },
  bad_request: { status: 400, message: 'The request is malformed.' },
  headers_too_large: { status: 431, message: 'The request headers are too large.' },
  request_timeout: { status: 408, message: 'The request was not received in time.' },
  expectation_failed: { status: 417, message: 'The Expect header names an expectation keygate does not meet (only 100-continue).' },
  transfer_coding_not_supported: { status: 501, message: 'The request body has a transfer coding keygate does not implement (only chunked).' },
  version_not_supported: { status: 505, message: 'This HTTP version is not supported (only HTTP/1.0 and HTTP/1.1).' },

  // Admin API and CLI
  unauthorized: { status: 401, message: 'An admin credential is required.' },
  forbidden: { status: 403, message: 'This credential may not use the admin API.' },
  not_found: { status: 404, message: 'Not found.' },
  deny_entry_not_found: { status: 404, message: 'No deny list entry has this id.' },
  key_not_found: { status: 404, message: 'No key has this id.' },
  anomaly_not_found: { status: 404, message: 'No anomaly has this id.' },
  webhook_not_found: { status: 404, message: 'No webhook has this id.' },
  delivery_not_found: { status: 404, message: 'The webhook has no delivery with this id.' },
  webhook_url_refused: { status: 400, message: 'The webhook URL may not be used: it is not a public http(s) address.' },
  method_not_allowed: { status: 405, message: 'This method is not allowed here.' },
  conflict: { status: 409, message: 'The request conflicts with the current state.' },
  key_not_active: { status: 409, message: 'The key is not active.' },
  payload_too_large: { status: 413, message: 'The request body is too large.' },
  host_not_allowed: { status: 421, message: 'This admin listener does not answer to this Host.' },
  too_many_streams: { status: 429, message: 'Too many event streams are open with this credential.' },
  unsupported_media_type: { status: 415, message: 'The request body must be JSON in UTF-8, sent without a content coding.' },
  validation_failed: { status: 400, message: 'The request body is not valid.' },
  internal_error: { status: 500, message: 'Internal error.' },
  admin_unavailable: { status: 503, message: 'The admin API could not be reached.' },

  // Integrations (SPEC §6): Gitea personal access tokens and n8n API keys
  gitea_not_configured: { status: 503, message: 'Gitea is not configured (GITEA_URL, GITEA_USERNAME, GITEA_PASSWORD).' },
  gitea_unreachable: { status: 502, message: 'Gitea could not be reached.' },
  gitea_timeout: { status: 504, message: 'Gitea did not answer in time.' },
  gitea_auth_failed: { status: 502, message: "Gitea refused keygate's credentials." },
  gitea_error: { status: 502, message: 'Gitea answered with an error.' },
  gitea_token_exists: { status: 409, message: 'The Gitea user already has a token with this name.' },
  gitea_scope_unknown: { status: 400, message: 'A scope is not one Gitea knows.' },
  gitea_token_not_found: { status: 404, message: 'No Gitea token has this id or name.' },
  gitea_user_not_found: { status: 404, message: 'Gitea has no user of this name.' },
  n8n_not_configured: { status: 503, message: 'n8n is not configured (N8N_URL, N8N_EMAIL, N8N_PASSWORD).' },
  n8n_unreachable: { status: 502, message: 'n8n could not be reached.' },
  n8n_timeout: { status: 504, message: 'n8n did not answer in time.' },
  n8n_auth_failed: { status: 502, message: "n8n refused keygate's credentials." },
  n8n_error: { status: 502, message: 'n8n answered with an error.' },
  n8n_key_exists: { status: 409, message: 'An n8n API key with this label already exists.' },
  n8n_scope_unknown: { status: 400, message: 'A scope is not one this n8n instance allows.' },
  n8n_key_not_found: { status: 404, message: 'No n8n API key has this id or label.' },

  // Start-up, configuration, storage
  config_invalid: { status: 500, message: 'The configuration is not valid.' },
  usage_error: { status: 400, message: 'The command line is not valid.' },
  listen_failed: { status: 500, message: 'A listener could not be opened: its address is in use, not on this machine, or not allowed.' },
  output_failed: { status: 500, message: "The command's output could not be written." },
  migration_modified: { status: 500, message: 'An applied migration file has been changed.' },
  migration_failed: { status: 500, message: 'A migration failed; nothing of the run was applied.' },
  store_locked: { status: 503, message: 'The embedded store is in use by another process.' },
  encryption_key_missing: { status: 500, message: "An encryption key is missing: KEYGATE_ENCRYPTION_KEY with DATABASE_URL, the embedded store's lost key file, or the key the store's key check (or its newest audit row) was sealed with: on PostgreSQL its other instances' key, on the embedded store the one it was started with." },
  audit_decrypt_failed: { status: 500, message: 'An audit record could not be decrypted.' },
  secret_decrypt_failed: { status: 500, message: 'A stored secret could not be decrypted.' },
  import_invalid: { status: 400, message: 'The import file is not valid.' },
} as const satisfies Record<string, { status: number; message: string }>

export type ErrorCode = keyof typeof ERRORS

export const errorCodes = Object.keys(ERRORS) as ErrorCode[]

/**
 * An expected failure with a catalogued code. Infrastructure faults (a dropped connection, a
 * bug) stay ordinary errors and are answered as `internal_error` or `store_unavailable`.
 */
export class KeygateError extends Error {
  readonly code: ErrorCode
  readonly status: number
  readonly details: Readonly<Record<string, unknown>> | undefined

  constructor(code: ErrorCode, message?: string, details?: Record<string, unknown>, options?: ErrorOptions) {
    super(message ?? ERRORS[code].message, options)
    this.name = 'KeygateError'
    this.code = code
    this.status = ERRORS[code].status
    this.details = details
  }
}

export function isKeygateError(err: unknown, code?: ErrorCode): err is KeygateError {
  return err instanceof KeygateError && (code === undefined || err.code === code)
}

/** The JSON body of every error answer: `{"error":{"code","message","request_id"}}`. */
/**
 * The JSON error answer. Anything shaped like a key in it reads `[redacted]`, as in the log,
 * whatever message or detail echoed it (a path, a query value, an id given where a key was
 * pasted).
 */
export function errorBody(code: ErrorCode, requestId: string, message?: string, details?: Record<string, unknown>): string {
  const error: Record<string, unknown> = { code, message: message ?? ERRORS[code].message, request_id: requestId }
  if (details !== undefined) error.details = details
  return scrub(JSON.stringify({ error }))
}

/**
 * No key has this id (the store's answer, and the CLI's for an id no URL can carry). A whole key
 * given where its id belongs (`keygate api-key revoke <the leaked key>`, an easy slip) is not
 * echoed back: anything shaped like a key reads `[redacted]`.
 */
export function keyNotFound(id: string): KeygateError {
  // Said so: `no key has the id "[redacted]"` alone left the reader guessing (found by a newcomer).
  // Only for a key's shape (keygate's or a legacy UUID): scrub also hides other secrets.
  const hint = holdsKey(id) ? ": that is shaped like an API key itself, not a key's id (`keygate api-key list` shows the ids)" : ''
  // Cut as a path is: the id of a URL of 16 KiB, or a CLI argument of 100 KB, came back whole
  // (found by a review). Scrubbed first (shownInput), so that the cut leaves no piece of a key shown.
  return new KeygateError('key_not_found', `no key has the id ${JSON.stringify(shownInput(id))}${hint}`)
}

/** A `validation_failed` error naming one field, as every validation failure names its fields. */
export function fieldInvalid(field: string, message: string): KeygateError {
  return new KeygateError('validation_failed', `${field}: ${message}`, { fields: [{ field, message }] })
}

/** What a system error means for whoever set the path or address up, in words; its message for any other code. */
const SYSTEM_ERROR_WORDS: Record<string, string> = {
  EPIPE: 'the reader closed it',
  ENOSPC: 'no space left on the device',
  EACCES: 'permission denied',
  EISDIR: 'it is a folder',
  EEXIST: 'a file is in the way',
  ENOTDIR: 'a file is in the way',
  EADDRINUSE: 'the address is in use',
  EADDRNOTAVAIL: 'no interface has that address',
  EPERM: 'operation not permitted',
  EROFS: 'the file system is read-only',
  EFBIG: 'the file size limit was reached',
  EDQUOT: 'the disk quota is used up',
  EIO: 'an input/output error of the device',
  EMFILE: 'too many open files',
  ENFILE: 'too many open files',
  ENOTEMPTY: 'a folder is not empty',
  ELOOP: 'too many levels of symbolic links',
}

export function systemErrorWords(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code
  return (code !== undefined ? SYSTEM_ERROR_WORDS[code] : undefined) ?? (err as Error).message
}

/**
 * The error codes of Emscripten's errno numbers, which PGlite's file system throws (`{errno}`):
 * its own numbering, not Linux's (51 is ENOSPC, 2 EACCES), from ERRNO_CODES in PGlite's
 * dist/pglite.js; test/errors.test.ts reads that table to check these.
 */
export const EMSCRIPTEN_ERRNO: Readonly<Record<number, string>> = {
  2: 'EACCES',
  19: 'EDQUOT',
  20: 'EEXIST',
  22: 'EFBIG',
  29: 'EIO',
  31: 'EISDIR',
  32: 'ELOOP',
  33: 'EMFILE',
  41: 'ENFILE',
  44: 'ENOENT',
  51: 'ENOSPC',
  54: 'ENOTDIR',
  55: 'ENOTEMPTY',
  63: 'EPERM',
  69: 'EROFS',
}

/** The codes where the data folder holds something other than what the store expects (a file where a folder should be). */
const NOT_WHAT_THE_STORE_EXPECTS = new Set(['EEXIST', 'ENOTDIR', 'EISDIR', 'ENOTEMPTY', 'ELOOP'])

/**
 * What an errno PGlite's file system threw means, in words: before (found by a review), a full
 * disk read `file system error errno 51` and a folder it could not write `errno 2`, both with the
 * hint of a file where a folder should be, which fits neither.
 */
export function fileSystemErrorWords(errno: unknown): string {
  const code = typeof errno === 'number' ? EMSCRIPTEN_ERRNO[errno] : undefined
  if (code === undefined) return `file system error errno ${String(errno)} (in Emscripten's numbering)`
  // ENOENT has no words in the table: the other callers' messages keep Node's, which names the path.
  const words = SYSTEM_ERROR_WORDS[code] ?? 'a file or folder is missing'
  const hint = NOT_WHAT_THE_STORE_EXPECTS.has(code) ? '; is something in the data folder not what the store expects, such as a file where a folder should be?' : ''
  return `file system error ${code} (${words}${hint})`
}

/**
 * A line of PostgreSQL's log, as PGlite passes it on (`2026-12-06 00:28:42.962 UTC [42] PANIC:
 * could not read file "global/pg_control"`): its level and its message, or undefined for any other
 * line (a HINT, PGlite's own). The message runs to the end of the line or to a line terminator in
 * it, a carriage return say. Before (found by a review of the patterns), the pattern ended in
 * `(.*)$`, and such a line was no log line at all (a FATAL unseen), found so by backtracking over
 * the white space before the message, each step reading the rest again: 445 ms for a line of
 * 32,000 spaces and a carriage return.
 */
export function postgresLogLine(line: string): { level: string; message: string } | undefined {
  const m = POSTGRES_LOG_LINE.exec(line.trim())
  return m ? { level: m[1] as string, message: m[2] as string } : undefined
}
const POSTGRES_LOG_LINE = /^(?:\S+ \S+ \S+ \[\d+\] )?(LOG|WARNING|ERROR|FATAL|PANIC|DETAIL):\s+(.*)/
