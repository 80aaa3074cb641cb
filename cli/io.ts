// What every command shares: parsed flags, output in tables or JSON, and the failure paths
// (exit 1 for a refused operation, 2 for a usage error, the reason on stderr).
import { writeSync } from 'node:fs'
import { parseArgs, type ParseArgsOptionsConfig } from 'node:util'
import type { Config } from '../config/schema.ts'
import { KeygateError, systemErrorWords, type ErrorCode } from '../core/errors.ts'
import { YEAR_10000_MS } from '../core/formats.ts'
import { scrub } from '../core/log.ts'
import type { TSchema } from '@sinclair/typebox'
import { dotted, escapeUnprintable, fieldWithKey, hasUnprintable, problemLine, problems } from '../core/validate.ts'

export const EXIT_OK = 0
export const EXIT_REFUSED = 1
export const EXIT_USAGE = 2

export interface Io {
  out(text: string): void
  err(text: string): void
  /** Stdin's bytes, up to `maxBytes`: undefined when it holds more (see readStdin). */
  readStdin(limit: StdinLimit): Promise<Buffer | undefined>
  env: Readonly<Record<string, string | undefined>>
}

/**
 * Writes all of `text` to `fd` before returning. A failure (a closed pipe, a full disk) is thrown
 * here, as output_failed, where the command can still say what it had done: written through the
 * process's streams it came after the command as an 'error' event, which ended the process with a
 * stack trace, and a key created or rotated a moment before went unmentioned (found by a review).
 */
function writeAll(fd: number, text: string): void {
  let rest = Buffer.from(text)
  while (rest.length > 0) {
    try {
      rest = rest.subarray(writeSync(fd, rest))
    } catch (err) {
      // A pipe the reader has not emptied yet: wait a moment and go on.
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN') Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5)
      else throw new KeygateError('output_failed', `could not write the output (${fd === 1 ? 'stdout' : 'stderr'}: ${systemErrorWords(err)})`)
    }
  }
}

export interface StdinLimit {
  maxBytes: number
  /** Up to the first line break only (not included); nothing after it is read. */
  firstLine?: boolean
}

/**
 * Reads stdin up to `maxBytes`, or with `firstLine` up to its first line break, and then stops
 * reading (leaving the loop destroys the stream, so the process can end while the writer keeps
 * it open). Undefined when more than `maxBytes` came first. Before (found by a review), stdin was
 * read to its end: `validate -` answered only once the writer closed it, and `yes KEY |` grew
 * the process without bound.
 */
async function readStdin({ maxBytes, firstLine = false }: StdinLimit): Promise<Buffer | undefined> {
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of process.stdin as AsyncIterable<Buffer>) {
    const end = firstLine ? chunk.indexOf(0x0a) : -1
    const part = end === -1 ? chunk : chunk.subarray(0, end)
    size += part.length
    if (size > maxBytes) return undefined
    chunks.push(part)
    if (end !== -1) break
  }
  return Buffer.concat(chunks)
}

export const processIo: Io = {
  out: (t) => writeAll(1, t),
  err: (t) => writeAll(2, t),
  readStdin,
  env: process.env,
}

export class UsageError extends KeygateError {
  constructor(message: string) {
    super('usage_error', message)
  }
}

/** Global flags every command takes. */
export const GLOBAL_OPTIONS = {
  config: { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
  'data-dir': { type: 'string' },
  'database-url': { type: 'string' },
  'admin-url': { type: 'string' },
} as const satisfies ParseArgsOptionsConfig

const GLOBAL_STRING_FLAGS = Object.entries(GLOBAL_OPTIONS)
  .filter(([, o]) => o.type === 'string')
  .map(([name]) => name)

export interface Parsed {
  values: Record<string, string | boolean | string[] | undefined>
  positionals: string[]
}

/** One subcommand of a group (`api-key create`, `gitea list`, ...). */
export interface Command<C> {
  usage: string
  summary: string
  options: ParseArgsOptionsConfig
  positionals: { min: number; max: number }
  /** Changes nothing: on the embedded store, a data folder that holds none is refused, not made a new empty store. */
  readOnly?: boolean
  /** The name in `usage` of the argument naming what the command works on (ID, ID|CIDR): an empty one is a usage error (refuseEmptyTarget). */
  target?: string
  /** Changes a key or an entry a store holds already: on the embedded store, a data folder that holds none is refused, as a new store would hold nothing to change. */
  changesStored?: boolean
  /** Checks the command line (usage errors before any store is opened) and returns the action. */
  prepare(p: Parsed): Action<C>
}

/**
 * A command's work. `beforeStore`, when the command runs on a store opened here (not through an
 * admin API), runs first, with the configuration: an exit code from it ends the command without
 * opening the store, for an answer the configuration alone gives. `beforeMaking` runs next when
 * the command would make a new embedded store (none is in the data folder): what it throws ends
 * the command with no store made, for a refusal the store plays no part in (before, found by a
 * docs walk, `gitea create` without Gitea's settings, or `api-key import` of a file that could
 * not be read, made a new store in a mistyped data folder, then said what was wrong).
 */
export type Action<C> = ((ctx: C) => Promise<number>) & {
  beforeStore?: (io: Io, config: Config) => Promise<number | undefined>
  beforeMaking?: (io: Io, config: Config) => Promise<void>
  /** As Command's `changesStored`, for this command line only (`gitea delete --forget`). */
  changesStored?: boolean
}

export const str = (p: Parsed, name: string) => p.values[name] as string | undefined

/**
 * Refuses (exit 2) the flags of `names` given to a command that does not use them: ignored, they
 * mislead (a store or an admin URL named that the command never opens). `why` follows them.
 */
export function refuseFlags(p: Parsed, names: readonly string[], why: string): void {
  const given = names.filter((name) => p.values[name] !== undefined)
  if (given.length > 0) throw new UsageError(`${given.map((name) => `--${name}`).join(', ')}: ${why}`)
}

/**
 * The FILE argument, when given: an empty one (`import "$FILE"` with FILE unset) is a usage
 * error, as an empty --config is (before, found by a review: `: cannot be read (ENOENT)`, exit 1,
 * naming neither the argument nor that it was empty).
 */
export function fileArgument(p: Parsed, usage: string): string | undefined {
  const file = p.positionals[0]
  if (file === '') throw emptyArgument('FILE', usage)
  return file
}

/**
 * Refuses an empty or blank argument naming what a command works on (`command.target`: a key's
 * ID, a deny list entry's ID|CIDR, a Gitea token's ID|NAME), as an empty FILE or KEY is refused:
 * `revoke "$ID"` with ID unset is a usage error, before a store is opened or an admin API or a
 * service asked. Before (found by a review), get, audit, update, revoke, rotate and `deny-list
 * remove` opened the store to say `no key has the id ""`, exit 1 (or, on a folder without one,
 * that it held none), `gitea delete` and `n8n delete` called the service first, and through an
 * admin API a blank id was sent and the answer told.
 */
export function refuseEmptyTarget(p: Parsed, command: Pick<Command<unknown>, 'target' | 'usage'>): void {
  if (command.target !== undefined && p.positionals[0]?.trim() === '') throw emptyArgument(command.target, command.usage)
}

function emptyArgument(name: string, usage: string): UsageError {
  return new UsageError(`${name}: an empty value is not allowed\nusage: ${usage}`)
}

/** A flag whose value must be one of `allowed`: anything else is a usage error, caught before a store is opened. */
export function choiceFlag<T extends string>(p: Parsed, flag: string, allowed: readonly T[]): T | undefined {
  const value = str(p, flag)
  if (value !== undefined && !(allowed as readonly string[]).includes(value)) {
    throw new UsageError(`--${flag}: ${JSON.stringify(value)} is not allowed; expected one of ${allowed.join(', ')}`)
  }
  return value as T | undefined
}

/**
 * How a flag spells the API's null: the schema's message would offer `null`, which no flag takes
 * (before: `--expires-at null` was told to use null). A flag not named here has no word for it
 * (`deny-list add --reason`: leave the flag out), and its message offers none (before, found by a
 * review: `--reason` and `--owner` were told "or null").
 */
const NULL_WORD_OF: Readonly<Record<string, string>> = { '--expires-at': 'never', '--owner': 'an empty value (no owner)' }

/**
 * The API's own schema, checked before any store is opened: a value a flag never takes is a
 * usage error (exit 2) naming the flag (`flagOf` maps a field to its flag; by default `--field`),
 * whether the command then goes to the store or to the admin API. (What depends on the store, or
 * on the time, is checked there and refused with exit 1.)
 */
export function checkFlags(schema: TSchema, values: Record<string, unknown>, flagOf: Readonly<Record<string, string>> = {}): void {
  const found = problems(schema, values)
  if (found.length === 0) return
  throw new UsageError(
    found
      .map((p) => {
        const field = dotted(p.path)
        const flag = flagOf[p.path[0] ?? ''] ?? `--${p.path[0] ?? ''}`
        const nullWord = NULL_WORD_OF[flag]
        const problem = p.path.length > 1 ? p : { ...p, allowed: p.allowed.replace(/ or null$/, nullWord === undefined ? '' : ` or ${nullWord}`) }
        return problemLine(problem, p.path.length > 1 ? `${flag} (${field})` : flag)
      })
      .join('; '),
  )
}

/**
 * The store's refusal of a keygate key in `fields` of `values` (core/validate.ts refuseKeyIn),
 * checked before any store is opened: a usage error naming the flag (`flagOf`, as checkFlags').
 * Before (found by a review), only the store checked it: `api-key create --name` holding a key,
 * on a folder without a store, made one (pgdata, encryption.key), then exited 1.
 */
export function refuseKeyInFlags(values: Record<string, unknown>, fields: readonly string[], flagOf: Readonly<Record<string, string>> = {}): void {
  const found = fieldWithKey(Object.fromEntries(fields.map((field) => [field, values[field]])))
  if (found !== undefined) throw new UsageError(`${flagOf[found.field] ?? `--${found.field}`}: ${found.problem}`)
}

/** The longest first line `-` takes: no key or token comes near it. */
export const SECRET_LINE_MAX_BYTES = 64 * 1024

/**
 * A secret given as an argument, or `-` to read it from the first line of stdin (out of the
 * process list); `noun` names it (key, token). An empty argument, or a first line with nothing on
 * it (stdin empty, or a blank line), is a usage error: before (found by a review), `validate -
 * < /dev/null`, the second of two commands reading one file in turn, or `validate "$KEY"` with
 * KEY unset said `key_invalid (malformed)`, exit 1, as if a bad key had been given.
 */
export async function argOrStdin(io: Io, value: string, noun: string): Promise<string> {
  if (value.trim() === '') throw new UsageError(`the ${noun} given is empty (an unset shell variable?): give the ${noun}, or \`-\` to read it from the first line of stdin`)
  if (value !== '-') return value
  const line = await io.readStdin({ maxBytes: SECRET_LINE_MAX_BYTES, firstLine: true })
  if (line === undefined) {
    throw new KeygateError('validation_failed', `the first line of stdin is longer than ${SECRET_LINE_MAX_BYTES / 1024} KiB; give the key or token alone on the first line`)
  }
  // Leniently: a byte that is not UTF-8 makes a key no key format holds, refused as malformed.
  const secret = line.toString('utf8').trim()
  if (secret === '') throw new UsageError(`no ${noun} was read from stdin: \`-\` takes the ${noun} from the first line of stdin, which was empty; give the ${noun} on that line, or as the argument`)
  return secret
}

/**
 * Refuses an argument with U+FFFD, the character Node puts for each byte of argv that is not
 * UTF-8, before it is seen here: `--name "$(printf 'caf\xe9')"` (Latin-1) was stored as `caf�`
 * without a word (found by a review), where a config file in Latin-1 is refused. U+FFFD typed on
 * purpose is refused too; no value keygate takes needs it.
 */
function refuseNotUtf8(parsed: Parsed): void {
  const why = 'holds bytes that are not UTF-8 (read as U+FFFD); give it in UTF-8'
  for (const [name, value] of Object.entries(parsed.values)) {
    if ([value].flat().some((v) => typeof v === 'string' && v.includes('\uFFFD'))) throw new UsageError(`--${name}: the value ${why}`)
  }
  const at = parsed.positionals.findIndex((v) => v.includes('\uFFFD'))
  if (at !== -1) throw new UsageError(`argument ${at + 1} ${why}`)
}

export function parse(argv: string[], options: ParseArgsOptionsConfig, positionals: { min: number; max: number }, usage: string): Parsed {
  const all: ParseArgsOptionsConfig = { ...GLOBAL_OPTIONS, ...options }
  let parsed: Parsed & { tokens: Array<{ kind: string; name?: string }> }
  try {
    parsed = parseArgs({ args: argv, options: all, strict: true, allowPositionals: true, tokens: true }) as typeof parsed
  } catch (err) {
    // A value that starts with a dash (`--name -dash`, `--expires-in -5d`): parseArgs's first line
    // alone ("argument is ambiguous") said neither what was read nor how to give it (found by a
    // review); its hint, `--name=-XYZ`, came on a line that was cut.
    const ambiguous = /^Option '(-[^']+)' argument is ambiguous/.exec((err as Error).message)
    if (ambiguous) {
      const flag = ambiguous[1] as string
      // The flag's occurrence followed by such a value (`--name a --name -dash` gives it twice).
      const at = argv.findIndex((a, i) => a === flag && argv[i + 1]?.startsWith('-') === true)
      const value = argv[at + 1] ?? ''
      const written = `${flag}=${value}`
      // As a shell takes it back: quoted when it holds anything but plain characters.
      const quoted = /^[\w@%+=:,./-]+$/.test(written) ? written : `'${written.replaceAll("'", "'\\''")}'`
      throw new UsageError(`${flag}: the value ${JSON.stringify(value)} starts with a dash, and could be an option; to give it as the value, write ${quoted}\nusage: ${usage}`)
    }
    throw new UsageError(`${(err as Error).message.split('\n')[0]?.replace(/\. To specify a positional.*$/, '')}\nusage: ${usage}`)
  }
  if (parsed.values.help) return parsed
  // parseArgs keeps the last of a repeated flag: `--status active --status revoked` would list
  // only revoked keys without a word, where the admin API refuses a query parameter given twice.
  const seen = new Set<string>()
  for (const token of parsed.tokens) {
    if (token.kind !== 'option' || token.name === undefined || all[token.name]?.multiple) continue
    if (seen.has(token.name)) throw new UsageError(`--${token.name} is given more than once\nusage: ${usage}`)
    seen.add(token.name)
  }
  refuseNotUtf8(parsed)
  // `--data-dir=$DIR` with DIR unset must not quietly mean the default folder (another store).
  for (const name of GLOBAL_STRING_FLAGS) {
    if (parsed.values[name] === '') throw new UsageError(`--${name}: an empty value is not allowed\nusage: ${usage}`)
  }
  const n = parsed.positionals.length
  if (n < positionals.min) throw new UsageError(`missing argument\nusage: ${usage}`)
  if (n > positionals.max) throw new UsageError(`unexpected argument ${JSON.stringify(parsed.positionals[positionals.max])}\nusage: ${usage}`)
  return parsed
}

/**
 * Text as a terminal should get it: with a control character (an escape sequence, a line break)
 * or an invisible format character (a bidi override reorders the row), quoted and escaped as
 * JSON writes it, the format characters and C1 as `\\uXXXX` (JSON leaves them raw), so a stored
 * value can neither rewrite the terminal nor forge a row. Input refuses them now; rows written
 * before may still hold them.
 */
export function printable(text: string): string {
  return hasUnprintable(text) ? escapeUnprintable(JSON.stringify(text)) : text
}

/**
 * A character a terminal shows two columns wide: East Asian wide and fullwidth forms, emoji
 * shown as emoji by default, and any character followed by the emoji variation selector (`❤️`).
 */
const WIDE = /[\u1100-\u115f\u2e80-\u303e\u3041-\u33ff\u3400-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\uac00-\ud7a3\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff60\uffe0-\uffe6\u{20000}-\u{3fffd}\ufe0f]|\p{Emoji_Presentation}/u
/** A grapheme a terminal shows in no column: combining marks and format characters alone. */
const INVISIBLE = /^[\p{Mn}\p{Me}\p{Cf}]+$/u
// Made at the first text that is not plain ASCII: making one loads ICU's break rules, about
// 30 ms of CPU, which every command paid at its start.
let graphemes: Intl.Segmenter | undefined

/**
 * The columns `text` takes in a terminal, grapheme by grapheme (a letter with its combining
 * marks is one; an emoji joined of several, `👨‍👩‍👧`, is one of two columns), as terminals that
 * follow wcwidth and Unicode's emoji presentation show them, closely enough for a table.
 */
export function displayWidth(text: string): number {
  if (/^[\x20-\x7e]*$/.test(text)) return text.length
  let n = 0
  for (const { segment } of (graphemes ??= new Intl.Segmenter(undefined, { granularity: 'grapheme' })).segment(text)) n += INVISIBLE.test(segment) ? 0 : WIDE.test(segment) ? 2 : 1
  return n
}

/** A fixed-width table; `null`/`undefined` cells print as `-`, control characters escaped. */
export function table(headers: string[], rows: Array<Array<string | number | null | undefined>>): string {
  const cells = rows.map((r) => r.map((c) => (c === null || c === undefined || c === '' ? '-' : printable(String(c)))))
  // By the columns a terminal shows, not by UTF-16 units: a name in Japanese or with an emoji
  // shifted every column after it in its row (found by a review).
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((r) => displayWidth(r[i] ?? ''))))
  const pad = (c: string, width: number) => c + ' '.repeat(Math.max(0, width - displayWidth(c)))
  const line = (r: string[]) => r.map((c, i) => (i === r.length - 1 ? c : pad(c, widths[i] ?? 0))).join('  ').trimEnd()
  return [line(headers.map((h) => h.toUpperCase())), ...cells.map(line)].join('\n') + '\n'
}

export function printJson(io: Io, value: unknown): void {
  io.out(JSON.stringify(value, null, 2) + '\n')
}

/**
 * A line of keygate's own for stderr, from text that may hold another's (Gitea's, n8n's or an
 * admin API's message, a stored value): every control character but the line break, and the
 * invisible format characters, escaped as `\\uXXXX`, so the text can neither rewrite the terminal
 * nor set its title. (Line breaks of text from elsewhere are dealt with where it comes in:
 * Gitea's and n8n's messages are made one line, an admin API's keeps only keygate's own.)
 */
export function terminalText(text: string): string {
  return text.split('\n').map(escapeUnprintable).join('\n')
}

/**
 * A warning on stderr, `keygate: warning: ...`, one line with what a terminal would act on
 * escaped: also with --json, whose stdout stays one JSON document (which holds it where it has one).
 */
export function printWarning(io: Io, text: string): void {
  io.err(`keygate: warning: ${escapeUnprintable(text)}\n`)
}

/** Reports a failure: the reason on stderr, and with --json the error object on stdout too. */
export function fail(io: Io, json: boolean, code: ErrorCode, message: string, details?: Readonly<Record<string, unknown>>): number {
  // Anything shaped like a key, and the configuration's secrets, hidden as the admin API's error
  // answers hide them (before, found by a review: `--type kg_...`, an unexpected argument or an
  // unknown command holding a key printed it whole, on stderr and in --json's object).
  message = scrub(message)
  // The details too, as the admin API's errorBody hides keys in its whole answer (before, found by
  // a review: `config check <key> --json` read `[redacted]: cannot be read`, and the details beside
  // it, `problems` and `file`, held the key whole).
  if (details !== undefined) details = JSON.parse(scrub(JSON.stringify(details))) as Readonly<Record<string, unknown>>
  // Each told where it can be: stdout may be the stream that failed, stderr too.
  try {
    // Every error path ends here: a message may carry a remote service's words (before, found
    // by a review, a Gitea answering with escape sequences cleared the screen through it).
    io.err(`keygate: ${terminalText(message)}\n`)
  } catch {}
  try {
    if (json) printJson(io, { error: { code, message, ...(details ? { details } : {}) } })
  } catch {}
  return code === 'usage_error' ? EXIT_USAGE : EXIT_REFUSED
}

/**
 * Prints what a command changed: when the output cannot be written, the error still says what was
 * done (`done`), so that it is not taken for a change that failed. Before (found by a review),
 * `api-key import FILE --json | head -1` said only "could not write the output", exit 1, with
 * every row imported, and a retry was refused as duplicates; so with revoke and update.
 */
export function printDone(print: () => void, done: string, note = ''): void {
  try {
    print()
  } catch (err) {
    if (err instanceof KeygateError && err.code === 'output_failed') throw new KeygateError('output_failed', `${done}, but ${err.message}${note}`)
    throw err
  }
}

/**
 * Prints what a command made and shows once (a key, a token): when the output cannot be written,
 * the error says it was made, and what to do (`made`), since it is shown nowhere else.
 */
export function printMade(print: () => void, made: string): void {
  printDone(print, made, ': its secret is shown nowhere else')
}

const UNITS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86_400, w: 604_800 }

/** Seconds in the largest unit that divides them: 3600 → `1h`, 157680000 → `1825d`. */
export function formatDuration(seconds: number): string {
  for (const unit of ['d', 'h', 'm'] as const) {
    const size = UNITS[unit] as number
    if (seconds % size === 0) return `${seconds / size}${unit}`
  }
  return `${seconds}s`
}

/** A duration as the flags take it: a whole number with s, m, h, d or w (`90d`). */
export const DURATION = /^(\d{1,9})([smhdw])$/

/**
 * `90d`, `12h`, `30m`, `45s`, `2w` → seconds; with `bounds` (seconds), a duration outside them is
 * refused in the flag's own units (`from 1h to 1825d`), not in the seconds the API takes.
 */
export function parseDuration(flag: string, value: string, bounds?: { min: number; max: number }): number {
  const m = DURATION.exec(value.trim())
  if (!m) throw new UsageError(`--${flag}: ${JSON.stringify(value)} is not a duration; expected a number with s, m, h, d or w, such as 90d`)
  const seconds = Number(m[1]) * (UNITS[m[2] as string] as number)
  if (bounds && (seconds < bounds.min || seconds > bounds.max)) {
    throw new UsageError(`--${flag}: ${JSON.stringify(value)} is ${seconds < bounds.min ? 'too short' : 'too long'}; expected from ${formatDuration(bounds.min)} to ${formatDuration(bounds.max)}`)
  }
  return seconds
}

/**
 * `--expires-in 30d` or `--expires-at TIME` (`never` for none) as an RFC 3339 time, null or absent.
 * `what` is what expires, for the refusal of a zero duration (a deny list's entry is no key).
 */
export function expiryFlags(p: Parsed, what: { would: string; example: string } = { would: 'expire the key', example: '30d' }): string | null | undefined {
  const inFlag = str(p, 'expires-in')
  const atFlag = str(p, 'expires-at')
  if (inFlag !== undefined && atFlag !== undefined) throw new UsageError('--expires-in and --expires-at exclude each other')
  if (inFlag !== undefined) {
    if (inFlag === 'never') return null
    const seconds = parseDuration('expires-in', inFlag)
    // Refused here, naming the flag (before: the API's `expires_at: ... is in the past`, exit 1).
    if (seconds === 0) throw new UsageError(`--expires-in: ${JSON.stringify(inFlag)} would ${what.would} at once; expected a duration above 0, such as ${what.example}`)
    const at = new Date(Date.now() + seconds * 1000)
    if (!(at.getTime() < YEAR_10000_MS)) throw new UsageError(`--expires-in: ${JSON.stringify(inFlag)} ends after the year 9999`)
    return at.toISOString()
  }
  if (atFlag !== undefined) return atFlag === 'never' ? null : atFlag
  return undefined
}

/**
 * Refuses an `--expires-at` already past (exit 1, as the store refuses it: it depends on the
 * time, not on the command line), naming the flag, before any store is opened here or an admin
 * API is asked (cli/main.ts runGroup). Before (found by a review), `api-key create`, `deny-list
 * add` and `n8n create` on a folder without a store made a new one there and only then said
 * `expires_at: ... is in the past`; through an admin API, they said its words, without the flag.
 */
export function refusePastExpiry(p: Parsed): void {
  const at = str(p, 'expires-at')
  if (at === undefined || at === 'never' || !(Date.parse(at) <= Date.now())) return
  const message = `${at} is in the past`
  throw new KeygateError('validation_failed', `--expires-at: ${message}`, { fields: [{ field: 'expires_at', message }] })
}

/**
 * A comma-separated flag value as its items, spaces around them ignored. An empty value or an
 * empty item (`a,,b`, `a,`, `,`) is a usage error naming the flag, as the same list in an
 * environment variable is refused (config/load.ts): before (found by a review), they were dropped,
 * and `--cidrs "$NET"` with NET unset made a key usable from anywhere, or took an update's
 * binding away. `none` is the flag's word for the empty list, where it has one (`--cidrs any`).
 */
export function parseList(flag: string, value: string | undefined, none?: string): string[] | undefined {
  if (value === undefined) return undefined
  if (none !== undefined && value.trim() === none) return []
  const items = value.split(',').map((s) => s.trim())
  if (!items.includes('')) return items
  const problem = value.trim() === '' ? 'an empty value is not allowed' : `${JSON.stringify(value)} has an empty item`
  throw new UsageError(`--${flag}: ${problem}; expected a comma-separated list without empty items${none === undefined ? '' : `, or ${none}`}`)
}

export function parseIntFlag(flag: string, value: string | undefined, min: number, max: number): number | undefined {
  if (value === undefined) return undefined
  if (!/^\d+$/.test(value) || Number(value) < min || Number(value) > max) {
    throw new UsageError(`--${flag}: ${JSON.stringify(value)} is not allowed; expected an integer from ${min} to ${max}`)
  }
  return Number(value)
}
