// One JSON object per line: level, time, message and fields (SPEC §1 names them). Anything shaped like a key is replaced
// before it is written, as a second line of defence behind code that never logs keys.
import { fstatSync } from 'node:fs'
import { KEY_IN_TEXT } from './keys/format.ts'

export type Level = 'debug' | 'info' | 'warn' | 'error'
const RANK: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 }

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void
  info(msg: string, fields?: Record<string, unknown>): void
  warn(msg: string, fields?: Record<string, unknown>): void
  error(msg: string, fields?: Record<string, unknown>): void
  child(fields: Record<string, unknown>): Logger
  enabled(level: Level): boolean
}

// Any prefix of lowercase letters and digits ending in _, then the id and secret shape; and UUIDs.
// No \b anchors: a key glued to other word characters (`Bearer%20kg_...`, `%3D<uuid>`) must go too.
// Also the secrets of the integrations: JWTs (n8n API keys and session cookies) and Gitea tokens
// (40 hex characters, not part of a longer hex run such as a SHA-256), and webhook signing secrets
// (`whsec_` and 32 bytes in base64). And SHA-256 hex (64 characters, not part of a longer run):
// an import row's key_hash, the hash of a legacy key, which no message shows (before, found by a
// migration review, a message that showed a wrongly shaped import body showed it).
// A JWT is looked for from the first `eyJ` of a dot-free run only (the lookbehind, which finds the
// nearest earlier one, if any, in the time to reach it): where that one is no JWT's start, no later
// one in the run is, and each tried to the run's end. So the time grows with the text, where a
// run of `eyJeyJ...` took it with the text's square: 16 KB 0.15 s, 64 KB 1.8 s, from a request's
// path that the admin listener's 404 names (found by a review).
const JWT_CHAR = '[0-9A-Za-z_-]'
// A key's `_`s percent-encoded too (`kg%5F…%5F…`), as a client may send one in a path that the
// access log writes as sent (before, found by a review, such a key was logged whole).
const KEY_OR_ENCODED = KEY_IN_TEXT.source.replaceAll('_', '(?:_|%5F)')
const KEYISH = new RegExp(
  `${KEY_OR_ENCODED}|whsec_(?:[0-9A-Za-z+/]|%2[BF]|%3D){20,}(?:=|%3D){0,2}|[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}|eyJ(?<!eyJ${JWT_CHAR}*?eyJ)${JWT_CHAR}+\\.${JWT_CHAR}+\\.${JWT_CHAR}+|(?:(?<![0-9a-f])|(?<=\\\\u[0-9a-f]{4}))[0-9a-f]{40}(?:[0-9a-f]{24})?(?![0-9a-f])`,
  'gi',
)

/**
 * The secrets of this process's configuration that `scrub` hides, in each form a message may
 * hold them (as written, JSON-escaped, percent-encoded), longest first: a secret inside a longer
 * one is not replaced first, leaving the rest of the longer one shown.
 */
let knownSecrets: string[] = []

/**
 * The shortest configured secret `scrub` looks for: a shorter one (a password of a few characters)
 * would hide those characters wherever else they appear, and is no secret worth the name.
 */
export const MIN_KNOWN_SECRET = 8

/**
 * A secret of letters alone shorter than this is not looked for either: `postgres` or `changeme`
 * as a password would hide that word in every line (`postgres://`, a host named postgres).
 */
const MIN_LETTERS_ONLY_SECRET = 16

/**
 * Makes `scrub` hide `secret` (the bootstrap admin token, a configured password or encryption key)
 * wherever it appears: in a log line, and in an error's message back to a client. The token is
 * free text chosen by the operator, which no pattern recognises; sent in a field that takes a list
 * of event names, it came back in the 400's message (found by a review).
 */
export function addKnownSecret(secret: string): void {
  if (secret.length < MIN_KNOWN_SECRET || (secret.length < MIN_LETTERS_ONLY_SECRET && /^[A-Za-z]+$/.test(secret))) return
  knownSecrets = secretForms([...knownSecrets, secret])
}

/**
 * Each of `secrets` in the forms a message may show it in (as written, JSON-escaped,
 * percent-encoded as a URL component or a whole URL), once each and longest first, so that a
 * secret inside another leaves no part of it shown when they are cut in order (`cutSecrets`).
 */
export function secretForms(secrets: Iterable<string>): string[] {
  const forms = new Set<string>()
  for (const s of secrets) for (const form of [s, JSON.stringify(s).slice(1, -1), encodeURIComponent(s), encodeURI(s)]) forms.add(form)
  return [...forms].sort((a, b) => b.length - a.length)
}

/** `text` with every one of `forms` (secretForms) replaced by `[redacted]`. */
export function cutSecrets(text: string, forms: readonly string[]): string {
  let out = text
  for (const form of forms) if (out.includes(form)) out = out.replaceAll(form, '[redacted]')
  return out
}

/** Forgets every secret addKnownSecret was given (for tests that run commands in their own process). */
export function forgetKnownSecrets(): void {
  knownSecrets = []
}

/** A percent-encoded unreserved character (RFC 3986: a letter, a digit, `-`, `.`, `_`, `~`), the same character to a URL's reader. */
const UNRESERVED_ESCAPE = /%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DEde]|5[Ff]|7[Ee])/g

/**
 * A match of KEYISH replaced, in JSON text: `[redacted]`, after the escaped character it starts
 * with, if any. A key just after a newline is `\nkg_…` there, and the key's pattern takes the `n`
 * for its prefix's first letter (`\u001bkg_…`: the whole `u001b`): replaced whole, the line held
 * `\[redacted]`, an escape JSON has none of, and every reader of the log refused it (found by a
 * review). Only when a backslash escapes the match's first character (an odd number of them).
 */
function redacted(match: string, ...rest: unknown[]): string {
  // (match, the groups captured if any, offset, text): the first number is the offset.
  const at = rest.findIndex((x) => typeof x === 'number')
  const offset = rest[at] as number
  const text = rest[at + 1] as string
  let slashes = 0
  while (offset - slashes > 0 && text.charCodeAt(offset - slashes - 1) === 92 /* \ */) slashes++
  if (slashes % 2 === 0) return '[redacted]'
  const kept = /^u[0-9a-f]{4}/i.test(match) ? 5 : 1
  return `${match.slice(0, kept)}[redacted]`
}

export function scrub(text: string): string {
  const out = cutSecrets(text, knownSecrets).replace(KEYISH, redacted)
  if (!out.includes('%')) return out
  // A secret with some of its letters or digits percent-encoded, as a path may carry it and the
  // access log writes it as sent (`/p/%6Bg_...`: the same path to an upstream; before, found by a
  // review, logged whole): looked for again with those read as the characters they stand for.
  // The text comes back so read only where that hid something; else as written.
  const decoded = out.replace(UNRESERVED_ESCAPE, (escape) => String.fromCharCode(Number.parseInt(escape.slice(1), 16)))
  if (decoded === out) return out
  const hidden = cutSecrets(decoded, knownSecrets).replace(KEYISH, redacted)
  return hidden === decoded ? out : hidden
}

function errorFields(err: Error): Record<string, unknown> {
  const code = (err as { code?: unknown }).code
  return { name: err.name, message: err.message, ...(code !== undefined ? { code } : {}) }
}

/**
 * The most characters of log lines that may wait in memory for a reader of stdout that does not
 * take them (a log shipper that stalled, alive but not reading): a line past it is dropped and
 * counted. stdout as a pipe is written asynchronously, and before (found by a review) every line
 * waited, the heap growing with each request under the access log until the OOM killer came.
 * A file or terminal is written synchronously, and never waits here.
 */
export const LOG_BACKLOG_MAX_CHARS = 8 * 1024 * 1024

/** Lines dropped since the reader last took up the backlog (writeStdout). */
let droppedLines = 0
/** Lines dropped since the process started: keygate_log_lines_dropped_total (core/metrics.ts) reads it at each scrape. */
let droppedSinceStart = 0

/** How many log lines this process has dropped since it started, stdout's reader not taking them (writeStdout). */
export function logLinesDropped(): number {
  return droppedSinceStart
}

/** A log line to stdout, or dropped and counted while the backlog is full; the count is logged once the reader has taken the backlog. */
function writeStdout(line: string): void {
  if (shared) return void writeShared(shared, line)
  const out = process.stdout
  if (out.writableLength + line.length <= LOG_BACKLOG_MAX_CHARS) {
    out.write(line)
    return
  }
  droppedSinceStart++
  // Past the stream's high-water mark, so its last write asked for a 'drain', emitted once the backlog is taken.
  if (droppedLines++ === 0) out.once('drain', reportDropped)
}

function droppedReport(): string {
  const dropped = droppedLines
  droppedLines = 0
  const record = { level: 'warn', time: new Date().toISOString(), message: `log lines dropped: stdout's reader did not take them, and ${LOG_BACKLOG_MAX_CHARS} characters of lines waited for it`, dropped }
  return JSON.stringify(record) + '\n'
}

function reportDropped(): void {
  process.stdout.write(droppedReport())
}

/**
 * Linux's PIPE_BUF: a write of at most this many bytes to a pipe is written whole or not at all,
 * never split around another process's write to the same pipe. A UNIX stream socket takes such a
 * write whole too while its send buffer is at least 8320 bytes (a write of up to half of it less
 * 64 bytes; the default is 208 KiB); a TCP socket gives no such promise (README, `serve --workers`).
 */
export const LOG_LINE_MAX_BYTES = 4096

/** The lines waiting to be written to a stdout shared with other processes (shareStdout). */
interface SharedStdout {
  lines: string[]
  chars: number
  writing: boolean
  failed: boolean
}

let shared: SharedStdout | undefined

/**
 * Makes this process write its log to a stdout other processes write to as well (`serve
 * --workers`: the primary and each worker) in whole lines only: each write to the stream holds
 * whole lines of at most LOG_LINE_MAX_BYTES in all, the next written only once the last is, and a
 * longer line is shortened to fit (its longest strings cut, `truncated: true`). Before (found by a
 * review), a reader that fell behind (a log shipper under load) got one process's line cut
 * part-way and another's inside it: each process's stream wrote what had waited as one write,
 * and a pipe takes such a write part-way when it is full. A file or a terminal is written as it was.
 */
export function shareStdout(): void {
  if (shared || process.stdout.isTTY) return
  try {
    const stat = fstatSync(1)
    if (!stat.isFIFO() && !stat.isSocket()) return
  } catch {
    return
  }
  shared = { lines: [], chars: 0, writing: false, failed: false }
}

function writeShared(s: SharedStdout, line: string): void {
  if (s.failed) return
  const fitting = fitLine(line)
  if (s.chars + process.stdout.writableLength + fitting.length > LOG_BACKLOG_MAX_CHARS) {
    droppedSinceStart++
    droppedLines++
    return
  }
  s.lines.push(fitting)
  s.chars += fitting.length
  pumpShared(s)
}

function pumpShared(s: SharedStdout): void {
  while (!s.writing && !s.failed) {
    if (s.lines.length === 0) {
      // The backlog taken: the lines dropped meanwhile are told.
      if (droppedLines === 0) return
      const report = fitLine(droppedReport())
      s.lines.push(report)
      s.chars += report.length
    }
    let chunk = ''
    let bytes = 0
    let taken = 0
    for (const line of s.lines) {
      const size = Buffer.byteLength(line)
      if (taken > 0 && bytes + size > LOG_LINE_MAX_BYTES) break
      chunk += line
      bytes += size
      taken++
    }
    s.lines.splice(0, taken)
    s.chars -= chunk.length
    let waited = false
    process.stdout.write(chunk, (err) => {
      // The stream's 'error' says why (watchLog); nothing more can be written.
      if (err) {
        s.failed = true
        s.lines = []
        s.chars = 0
        return
      }
      if (!waited) return
      s.writing = false
      pumpShared(s)
    })
    // Written whole at once, as while the reader keeps up: the next goes now, as the stream's own
    // would (a line logged just before a process.exit is not left waiting). Else once this one is.
    if (process.stdout.writableLength > 0) {
      waited = true
      s.writing = true
    }
  }
}

/**
 * `line` (one JSON object and its newline) in at most LOG_LINE_MAX_BYTES: as it is, or with its
 * longest strings cut (after scrub, so no cut leaves part of a secret shown) and `truncated: true`.
 */
export function fitLine(line: string): string {
  if (line.length <= LOG_LINE_MAX_BYTES / 3 || Buffer.byteLength(line) <= LOG_LINE_MAX_BYTES) return line
  const record = recordOf(line)
  record.truncated = true
  // Every string longer than `at` characters cut to its first `at` and `…`: the longest are cut,
  // and as little as fits. The largest such `at` is searched for, one writing of the record a
  // try. Before (found by a review), each pass cut the one longest string and wrote the whole
  // record again: as many passes as strings to cut (2000 strings of 100 characters, 6 s of a
  // stalled event loop).
  // Never between the halves of a surrogate pair (an emoji): a lone `\ud83d` is an error or a
  // replacement character to a JSON reader (before, found by a review, a cut could end so).
  const cut = (at: number) => JSON.stringify(record, (_key, v: unknown) => (typeof v === 'string' && v.length > at ? `${v.slice(0, isHighSurrogate(v.charCodeAt(at - 1)) ? at - 1 : at)}…` : v)) + '\n'
  const fits = (text: string) => Buffer.byteLength(text) <= LOG_LINE_MAX_BYTES
  let longest = 0
  const measure = (v: unknown): void => {
    if (typeof v === 'string') longest = Math.max(longest, v.length)
    else if (v !== null && typeof v === 'object') for (const w of Object.values(v)) measure(w)
  }
  measure(record)
  let fitting = MIN_CUT_CHARS
  let text = cut(fitting)
  if (!fits(text)) {
    // Too many fields or too long names for any cut: what says what the line was, itself cut.
    const short = (v: unknown) => String(v).slice(0, 2 * MIN_CUT_CHARS)
    return JSON.stringify({ level: short(record.level), time: short(record.time), message: short(record.message), truncated: true }) + '\n'
  }
  // `fitting` fits; more than `over` does not (or is more than any string holds).
  let over = longest
  while (over - fitting > 1) {
    const mid = Math.floor((fitting + over) / 2)
    const tried = cut(mid)
    if (fits(tried)) [fitting, text] = [mid, tried]
    else over = mid
  }
  return text
}

const isHighSurrogate = (code: number) => code >= 0xd800 && code <= 0xdbff

/** The fewest characters fitLine keeps of a string it cuts. */
const MIN_CUT_CHARS = 32

/**
 * The JSON object `line` holds; a line that holds none, as its text in a record of its own. The
 * scrubber once left such lines (`\[redacted]` for a key just after a newline; it keeps the escape
 * now, see `redacted`), and fitLine is given what the logger's writer is: before (found by a
 * review), such a line, long, made fitLine's JSON.parse throw out of the log call, into whatever
 * logged (a request's handler, a stop).
 */
function recordOf(line: string): Record<string, unknown> {
  try {
    const parsed: unknown = JSON.parse(line)
    if (parsed !== null && typeof parsed === 'object' && !Array.isArray(parsed)) return parsed as Record<string, unknown>
  } catch {}
  const level = /^\{"level":"(debug|info|warn|error)"/.exec(line)?.[1] ?? 'info'
  return { level, time: new Date().toISOString(), message: 'a log line that is not one JSON object, as written', line: line.trimEnd() }
}

/** How long a store must go without a failure before its outage is logged as over (the gateway's key look-ups, the admin API's answers). */
export const STORE_QUIET_MS = 10_000

export interface OutageLog {
  /** A failure: the outage's first at warn (`start`), each after it at debug (`each`). */
  failed(fields: Record<string, unknown>): void
  /** A success: the end of the outage at info (`end`, with the failures counted), once `STORE_QUIET_MS` have passed since the last failure. */
  succeeded(): void
}

/**
 * An outage said once: at warn when it starts, at info when it ends, each failure in between at
 * debug, as the store check, Redis and the webhooks log theirs (before, found by a chaos review,
 * the gateway wrote a warn line for every request of an unknown key: 298 lines in 1.6 s). It ends
 * with a success `STORE_QUIET_MS` after the last failure: one that fails now and then (a bad
 * connection of the pool) is one outage, not a warning and an info line each time (found by a
 * read-back).
 */
export function outageLog(log: Logger, now: () => number, messages: { start: string; each: string; end: string }): OutageLog {
  let failing = 0
  let lastFailure = 0
  return {
    failed(fields) {
      lastFailure = now()
      if (failing++ === 0) log.warn(messages.start, fields)
      else log.debug(messages.each, fields)
    },
    succeeded() {
      if (failing === 0 || now() - lastFailure < STORE_QUIET_MS) return
      log.info(messages.end, { failed: failing })
      failing = 0
    },
  }
}

/**
 * True when called first, then again only once `ms` have passed (by `now`) since it last was: how
 * a line said at most once so often (a warning of something that goes on) is let through.
 */
export function oncePer(ms: number, now: () => number = Date.now): () => boolean {
  let last = -Infinity
  return () => {
    const at = now()
    if (at - last < ms) return false
    last = at
    return true
  }
}

export function createLogger(options: { level?: Level; write?: (line: string) => void; fields?: Record<string, unknown> } = {}): Logger {
  const min = RANK[options.level ?? 'info']
  const write = options.write ?? writeStdout
  const base = options.fields ?? {}
  const emit = (level: Level, msg: string, fields?: Record<string, unknown>) => {
    if (RANK[level] < min) return
    const record: Record<string, unknown> = { level, time: new Date().toISOString(), message: msg, ...base }
    if (fields) for (const [k, v] of Object.entries(fields)) record[k] = v instanceof Error ? errorFields(v) : v
    write(scrub(JSON.stringify(record)) + '\n')
  }
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (fields) => createLogger({ ...options, fields: { ...base, ...fields } }),
    enabled: (level) => RANK[level] >= min,
  }
}

/** A logger that drops everything (tests and library use). */
export const silentLogger: Logger = createLogger({ write: () => {} })
