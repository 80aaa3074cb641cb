// Turns TypeBox validation into keygate's messages: each problem with its path, the value and
// what is allowed. Used for the config file, API bodies and CLI input alike.
import { Kind, type TSchema } from '@sinclair/typebox'
import { Value, ValueErrorType } from '@sinclair/typebox/value'
import { FORMAT_WHY, FORMAT_WORDS } from './formats.ts'
import { fieldInvalid, KeygateError } from './errors.ts'
import { decodeEscapes } from './http.ts'
import { scrub } from './log.ts'
import { holdsKeyShape } from './keys/format.ts'

/** What the document says of a time that must be ahead (an end: a key's, a deny entry's). */
export const NOT_PAST = 'Not in the past (else 400 `validation_failed`).'

/** What the document says of each field refuseKeyIn reads. */
export const NO_KEY_IN = 'Refused (`validation_failed`) when it holds what looks like a keygate API key (of any prefix), as written or percent-decoded: name a key by its id.'

/**
 * Refuses a keygate key in free text that is stored, audited and shown or sent on (a key's name,
 * owner, metadata and revocation reason; a deny entry's reason; a webhook's URL and description;
 * a Gitea token's name; an n8n key's label): a review stored a working key's plaintext in another key's
 * metadata and revocation reason, and it reached the audit log and webhook receivers. Named by
 * field, never quoted; found as written or percent-decoded (`kg%5F...`), since a URL's reader
 * decodes it. (A UUID, the replaced system's key shape, is also an everyday id, so it
 * is not refused.)
 */
export function refuseKeyIn(fields: Record<string, unknown>): void {
  const found = fieldWithKey(fields)
  if (found !== undefined) throw fieldInvalid(found.field, found.problem)
}

/**
 * The first of `fields` holding a keygate key (a value other than text read as its JSON), with
 * refuseKeyIn's words for it; undefined when none. Also for the CLI's flags, checked before
 * anything is opened (cli/io.ts refuseKeyInFlags).
 */
export function fieldWithKey(fields: Record<string, unknown>): { field: string; problem: string } | undefined {
  for (const [field, value] of Object.entries(fields)) {
    if (value === undefined || value === null) continue
    const text = typeof value === 'string' ? value : JSON.stringify(value)
    // Percent-decoded too: a webhook URL's `?api_key=kg%5F...` is the key to its receiver, which
    // decodes it (before, it was stored, listed, audited and sent with every delivery).
    if (holdsKeyShape(text) || (text.includes('%') && holdsKeyShape(decodeEscapes(text)))) {
      return { field, problem: 'holds what looks like a keygate API key, which is never stored in plaintext; name the key by its id instead' }
    }
  }
  return undefined
}

/**
 * What text shown back to people may not hold, as a regular expression's character class: control
 * characters (C0, DEL, C1: an escape sequence or a line break rewrites a terminal or forges a
 * row) and the invisible format characters that reorder or hide text (the bidi marks, embeddings,
 * overrides and isolates U+061C, U+200E/F, U+202A-E, U+2066-9: `\u202eevil` printed a row of
 * `api-key list` backwards on a bidi terminal; the zero-width space and word joiners U+180E,
 * U+200B, U+2060-4, U+FEFF; the line and paragraph separators U+2028/9), and the other
 * characters that show nothing and are no part of spelling a word, which make a name look like
 * another (`ad\u00admin` for `admin`) or blank: the soft hyphen U+00AD, the combining grapheme
 * joiner U+034F, the Hangul fillers U+115F/60, U+3164 and U+FFA0, the Khmer inherent vowels
 * U+17B4/5, the deprecated format characters U+206A-F, the interlinear annotation marks
 * U+FFF9-B, and plane 14 (its lead surrogate U+DB40): the tag characters U+E0000-7F, which
 * hide a whole text from view ("ASCII smuggling") and otherwise only spell the three
 * subdivision flags, and the variation selectors supplement. The zero-width non-joiner and
 * joiner U+200C/D are text: Persian and Indic words are spelled with them, and emoji sequences
 * (a family, a flag) joined by them; they reorder nothing. So are the variation selectors
 * U+FE00-F (U+FE0F makes ❤ an emoji).
 *
 * A character class for the schemas' `pattern`, which TypeBox compiles without the `u` flag:
 * there U+DB40 is the UTF-16 unit every plane-14 character starts with. (A validator reading
 * the published pattern with `u` takes it as a lone surrogate only, and lets plane 14 through;
 * keygate's own check is the one that counts.)
 */
export const UNPRINTABLE_CHARS =
  '\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u034f\\u061c\\u115f\\u1160\\u17b4\\u17b5\\u180e\\u200b\\u200e\\u200f\\u2028-\\u202e\\u2060-\\u206f\\u3164\\ufeff\\uffa0\\ufff9-\\ufffb\\udb40'

/** The pattern of text fields shown back to people (names, owners, reasons): none of UNPRINTABLE_CHARS. */
export const PRINTABLE = `^[^${UNPRINTABLE_CHARS}]*$`

/** What PRINTABLE refuses, in words (the end of a validation message). */
export const PRINTABLE_WORDS = 'without control characters or invisible format characters (bidi overrides, zero-width characters)'

/**
 * A character that shows by itself, as a pattern: not white space (`" "`, U+00A0, U+3000, which
 * JavaScript's `\s` covers), the blank braille pattern U+2800, the zero-width non-joiner and
 * joiner, a variation selector (Mongolian's free ones too) or a combining mark of the general
 * blocks (each text only beside another character), nor the musical format and combining
 * characters (U+1D167-9, U+1D173-82, U+1D185-B, U+1D1AA-D); any other character of another plane
 * (a pair of UTF-16 units: the schemas' patterns are read without the `u` flag). A combining mark
 * of a script's own block alone (a Hebrew point, a virama) is taken: a terminal draws it on a
 * dotted circle or the cell before, and naming every such mark here would not end.
 */
const SHOWS = `(?:[^\\s\\u2800\\u200c\\u200d\\ufe00-\\ufe0f\\u180b-\\u180d\\u180f\\u0300-\\u036f\\u1ab0-\\u1aff\\u1dc0-\\u1dff\\u20d0-\\u20ff\\ufe20-\\ufe2f\\ud800-\\udfff]|(?!\\ud834[\\udd67-\\udd69\\udd73-\\udd82\\udd85-\\udd8b\\uddaa-\\uddad])[\\ud800-\\udbff][\\udc00-\\udfff])`

/**
 * The pattern of a name (a key's, its owner's, a Gitea token's): PRINTABLE, and a character in it
 * that shows (SHOWS). Before, found by reviews, a name of white space alone or of U+2800 was
 * taken and printed as an empty cell in `api-key list`, and then one of joiners, variation
 * selectors or combining marks alone (the Hangul fillers were refused for that already).
 */
export const NAME_TEXT = `^(?=[\\s\\S]*${SHOWS})[^${UNPRINTABLE_CHARS}]*$`

/** NAME_TEXT without `<`, `>`, `&` or `"` (an n8n key's label: n8n refuses them). */
export const NAME_TEXT_NO_MARKUP = `^(?=[\\s\\S]*${SHOWS})[^<>&"${UNPRINTABLE_CHARS}]*$`

/**
 * The pattern of a URL kept as written (a webhook's): none of UNPRINTABLE_CHARS, no white space
 * and no backslash. The URL parser drops a tab or line break anywhere and spaces and control
 * characters at either end, and reads `\` as `/`: the URL stored and requested was not the one
 * checked, and a key split by a tab passed the key check whole (found by a review).
 */
export const URL_AS_WRITTEN = `^[^\\s\\\\${UNPRINTABLE_CHARS}]*$`

/**
 * Anything but `.` and `..`: a name that goes into a URL path as a segment of its own (a Gitea
 * user's), where either would resolve to another endpoint.
 */
export const NOT_DOT_SEGMENT = '^(?!\\.\\.?$)'

/** A host name the admin listener answers to (admin.allowed_hosts), in lower case, or `*` for any. */
export const ALLOWED_HOST = '^(?:\\*|[a-z0-9]([a-z0-9-]*[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)$'

/** The words for the patterns that have them (else a message quotes the pattern). */
const PATTERN_WORDS: Record<string, string> = {
  [PRINTABLE]: PRINTABLE_WORDS,
  [NAME_TEXT]: `with something visible (not only spaces), ${PRINTABLE_WORDS}`,
  [NAME_TEXT_NO_MARKUP]: `with something visible (not only spaces), without <, >, & or ", ${PRINTABLE_WORDS}`,
  // Before (found by a docs walk), a refused `..` was told to match ^(?!\.\.?$).
  [NOT_DOT_SEGMENT]: 'other than "." or ".."',
  // Before (found by a docs walk), the pattern itself.
  [ALLOWED_HOST]: 'naming a host in lower case (letters, digits and -, in labels between dots, such as keygate.internal), or * for any',
  [URL_AS_WRITTEN]: 'without spaces, line breaks, backslashes, control characters or invisible format characters (the URL parser drops or rewrites them: percent-encode what the URL needs)',
}

const UNPRINTABLE = new RegExp(`[${UNPRINTABLE_CHARS}]`)
/** Also a plane-14 character's trailing half, so that both halves are escaped. */
const EVERY_UNPRINTABLE = new RegExp(`\\udb40[\\udc00-\\udfff]|${UNPRINTABLE.source}`, 'g')

/** Whether `text` holds any of UNPRINTABLE_CHARS. */
export function hasUnprintable(text: string): boolean {
  return UNPRINTABLE.test(text)
}

/**
 * JSON text with UNPRINTABLE_CHARS escaped as `\\uXXXX` (JSON.stringify escapes C0 but leaves C1
 * and the format characters as they are): still the same JSON, and a terminal can show it
 * without being rewritten.
 */
export function escapeUnprintable(json: string): string {
  return json.replace(EVERY_UNPRINTABLE, (c) => {
    const one = (unit: number) => `\\u${unit.toString(16).padStart(4, '0')}`
    return c.length === 2 ? one(c.charCodeAt(0)) + one(c.charCodeAt(1)) : one(c.charCodeAt(0))
  })
}

/** A string of the given length bounds, in words. */
function stringLength(min: number | undefined, max: number | undefined): string {
  if (min === 1) return max ? `a non-empty string of at most ${max} characters` : 'a non-empty string'
  if (min && max) return `a string of ${min} to ${max} characters`
  if (min) return `a string of at least ${min} characters`
  return max ? `a string of at most ${max} characters` : 'a string'
}

/**
 * What an object with named keys is called: a mapping in the configuration (YAML's word), an
 * object in an API body or an import row (JSON's; before, one admin answer said "expected a
 * mapping" beside others saying "a JSON object": found by a newcomer).
 */
export type ObjectWord = 'mapping' | 'object'

/** The words for what a schema node allows. */
export function describeAllowed(schema: TSchema, object: ObjectWord = 'mapping'): string {
  switch (schema[Kind]) {
    case 'Integer':
    case 'Number': {
      const noun = schema[Kind] === 'Integer' ? 'an integer' : 'a number'
      if (schema.minimum !== undefined && schema.maximum !== undefined) return `${noun} from ${schema.minimum} to ${schema.maximum}`
      if (schema.minimum !== undefined) return `${noun} ≥ ${schema.minimum}`
      return noun
    }
    case 'Boolean':
      return 'true or false'
    case 'Null':
      return 'null'
    case 'String': {
      if (schema.format && FORMAT_WORDS[schema.format]) return FORMAT_WORDS[schema.format] as string
      // The length and the pattern both: "" against a printable, non-empty field was told only the
      // pattern, which "" matches.
      const length = stringLength(schema.minLength as number | undefined, schema.maxLength as number | undefined)
      if (!schema.pattern) return length
      return `${length} ${PATTERN_WORDS[schema.pattern as string] ?? `matching ${schema.pattern}`}`
    }
    case 'Literal':
      return JSON.stringify(schema.const)
    case 'Union': {
      const parts = (schema.anyOf as TSchema[]).map((s) => (s[Kind] === 'Literal' ? String(s.const) : describeAllowed(s, object)))
      return (schema.anyOf as TSchema[]).every((s) => s[Kind] === 'Literal') ? `one of ${parts.join(', ')}` : parts.join(' or ')
    }
    case 'Array': {
      const items = schema.items as TSchema
      const item =
        items[Kind] === 'Object'
          ? `${object}s, each ${describeAllowed(items, object).replace(/^an? \w+ /, '')}`
          : describeAllowed(items, object)
              .replace(/^one of /, 'values from ')
              .replace(/^an? /, '')
              .replace(/^(non-empty )?(string|integer|number)\b/, '$1$2s')
      const bounds = [schema.minItems ? `at least ${schema.minItems}` : '', schema.maxItems !== undefined ? `at most ${schema.maxItems}` : ''].filter(Boolean)
      // Items of any kind (an import's rows, checked one by one after): "a list", not "a list of valid value".
      if (item === 'valid value') return `a list${bounds.length ? ` (${bounds.join(', ')} items)` : ''}`
      return `a list of ${item}${schema.uniqueItems ? ' without repeats' : ''}${bounds.length ? ` (${bounds.join(', ')})` : ''}`
    }
    case 'Object':
      return schema.properties && Object.keys(schema.properties).length > 0
        ? `${object === 'mapping' ? 'a mapping' : 'an object'} with ${(schema.minProperties as number | undefined) === 1 ? 'at least one of ' : ''}the keys ${Object.keys(schema.properties as object).join(', ')}`
        : 'a JSON object'
    case 'Record':
      return 'a JSON object'
    default:
      return 'a valid value'
  }
}

/** The schema node at a path, following object properties and array items. */
export function schemaAt(root: TSchema, path: readonly string[]): TSchema | undefined {
  let s: TSchema | undefined = root
  for (const p of path) {
    if (!s) return undefined
    if (s[Kind] === 'Union') s = (s.anyOf as TSchema[]).find((x) => x[Kind] === 'Object' || x[Kind] === 'Array')
    if (!s) return undefined
    // Own properties only: `__proto__` or `constructor` is an unknown key, not Object.prototype's.
    if (s[Kind] === 'Object') s = Object.hasOwn(s.properties as object, p) ? (s.properties as Record<string, TSchema>)[p] : undefined
    else if (s[Kind] === 'Array') s = s.items as TSchema
    else return undefined
  }
  return s
}

/** `a.b[0].c` from ['a','b','0','c']. */
export function dotted(path: readonly string[]): string {
  return path.map((p, i) => (/^\d+$/.test(p) ? `[${p}]` : i === 0 ? p : `.${p}`)).join('')
}

export interface Problem {
  path: string[]
  kind: 'unknown' | 'required' | 'invalid'
  value: unknown
  /** What is allowed (for `unknown`: the keys allowed at that level). */
  allowed: string
  /** For `unknown`: the keys allowed at that level, one by one. */
  known?: readonly string[]
  /** For `unknown`: why the key may not be what it looks like, as `unknownKeyShown` tells. */
  hint?: string
  /** For `invalid`: why the value is refused, where its format says more than `allowed` (FORMAT_WHY). */
  why?: string
}

/**
 * The most problems an answer to a request lists (a body's or query's fields, an import's rows):
 * past them the check stops, and the answer says there are more. Every problem was listed before,
 * and a 868 KB body of 80,000 unknown fields was answered with 22.8 MB, holding the event loop
 * for 4 s; a 31 MB import body with 2.5 million, with 298 MB over 67 s (found by a review).
 */
export const MAX_LISTED_PROBLEMS = 20

/** `lines` cut to the first `max`, and a last line counting the rest. */
export function firstProblems(lines: readonly string[], max = MAX_LISTED_PROBLEMS): string[] {
  const rest = lines.length - max
  return rest > 0 ? [...lines.slice(0, max), `and ${rest} more ${rest === 1 ? 'problem' : 'problems'}`] : [...lines]
}

/** Why the format of `schema` (or of one member of a union, `expires_at`'s date-time or null) refuses `value`, where it says more than its words. */
function formatWhy(schema: TSchema, value: string): string | undefined {
  const nodes = schema[Kind] === 'Union' ? (schema.anyOf as TSchema[]) : [schema]
  for (const s of nodes) {
    const why = typeof s.format === 'string' ? FORMAT_WHY[s.format]?.(value) : undefined
    if (why !== undefined) return why
  }
  return undefined
}

/** Whether a value under `schema` can hold an array `cutToBound` would cut (an object or array schema). */
const holdsArrays = (schema: TSchema): boolean => schema[Kind] === 'Object' || schema[Kind] === 'Array'

/**
 * `value` with every array longer than its schema's maxItems cut to one element past it, following
 * an object's own properties and an array's items (not below an array whose elements are compared,
 * uniqueItems or contains: two elements cut alike would read as repeats). Copies are made only
 * along the way to a cut, each recorded in `originals` against the value it stands for; `value`
 * itself where nothing is cut. TypeBox's check of an array goes on through every element after it
 * has said the array is too long (and hashes them all for uniqueItems): 200,000 strings as a key's
 * scopes (100 at most) held the admin listener for 80 ms, five times a body that is only parsed.
 * The array's own problem is the same with one element past the bound; what its elements past
 * that hold is not told (the array is refused as a whole).
 */
function cutToBound(schema: TSchema, value: unknown, originals: Map<unknown, unknown>): unknown {
  if (Array.isArray(value)) {
    if (schema[Kind] !== 'Array') return value
    const max = schema.maxItems
    let out: unknown[] | undefined = typeof max === 'number' && value.length > max + 1 ? value.slice(0, max + 1) : undefined
    const items = schema.items as TSchema
    if (holdsArrays(items) && schema.uniqueItems !== true && schema.contains === undefined) {
      const walked = out ?? value
      for (let i = 0; i < walked.length; i++) {
        const cut = cutToBound(items, walked[i], originals)
        if (cut !== walked[i]) (out ??= value.slice())[i] = cut
      }
    }
    if (out === undefined) return value
    originals.set(out, value)
    return out
  }
  if (value === null || typeof value !== 'object' || schema[Kind] !== 'Object') return value
  const own = value as Record<string, unknown>
  let out: Record<string, unknown> | undefined
  for (const [name, s] of Object.entries(schema.properties as Record<string, TSchema>)) {
    if (!holdsArrays(s) || !Object.hasOwn(own, name)) continue
    const was = own[name]
    const cut = cutToBound(s, was, originals)
    if (cut === was) continue
    // A copy with every own property as it stands (not enumerable ones, accessors: not run again).
    out ??= Object.create(Object.getPrototypeOf(own), Object.getOwnPropertyDescriptors(own)) as Record<string, unknown>
    Object.defineProperty(out, name, { value: cut, writable: true, enumerable: true, configurable: true })
  }
  if (out === undefined) return value
  originals.set(out, value)
  return out
}

const SURROGATE_PAIR = /[\ud800-\udbff][\udc00-\udfff]/g

/** How many characters (code points) `text` holds: the length JSON Schema and PostgreSQL count, where a JavaScript string's is in UTF-16 units. */
export function characterCount(text: string): number {
  // Each surrogate pair is one character; a lone surrogate is one, as a string's iterator counts
  // them. Counted so, not by iterating: the column of a fault in a minified 30 MB body (jsonFault)
  // took 0.2 to 0.5 s by iterating, 15 to 25 ms so.
  return text.length - (text.match(SURROGATE_PAIR)?.length ?? 0)
}

/**
 * Whether `schema` takes the string `value` when a string's length is counted in characters (code
 * points), as JSON Schema counts it and PostgreSQL's `length()` checks the stored columns: TypeBox
 * counts UTF-16 units, and refused a name of 101 to 200 emoji that the store and the document
 * allow (found by a review). A string is at most as many characters as units, so only a maxLength
 * refusal, alone or inside a union (an owner: a string or null), is read again. (A minLength above
 * 1, only the n8n login email's 3, could pass a shorter string of astral characters; n8n refuses
 * that login.)
 */
function takesCountingCharacters(schema: TSchema, value: string): boolean {
  if (schema[Kind] === 'Union') return (schema.anyOf as TSchema[]).some((s) => (s[Kind] === 'String' ? takesCountingCharacters(s, value) : Value.Check(s, value)))
  if (schema[Kind] !== 'String') return false
  for (const e of Value.Errors(schema, value)) {
    if (e.type !== ValueErrorType.StringMaxLength || characterCount(value) > (schema.maxLength as number)) return false
  }
  return true
}

/** The one member of `union` that takes a value of `value`'s shape (an object, or a list), if one alone does. */
function memberOfShape(union: TSchema, value: object): TSchema | undefined {
  const kind = Array.isArray(value) ? 'Array' : 'Object'
  const members = (union.anyOf as TSchema[]).filter((s) => s[Kind] === kind)
  return members.length === 1 ? members[0] : undefined
}

/**
 * The problems of `value` against `schema`, one per path, in document order: every one, or the
 * first `limit` (the check stops there, so that its work is bounded too). An array past its
 * maxItems is checked only to one element past it (cutToBound); the values told are `value`'s own.
 */
export function problems(schema: TSchema, value: unknown, limit = Number.POSITIVE_INFINITY, object: ObjectWord = 'mapping'): Problem[] {
  const out: Problem[] = []
  const seen = new Set<string>()
  const originals = new Map<unknown, unknown>()
  for (const e of Value.Errors(schema, cutToBound(schema, value, originals))) {
    if (out.length >= limit) break
    if ((e.type === ValueErrorType.StringMaxLength || e.type === ValueErrorType.Union) && typeof e.value === 'string' && takesCountingCharacters(e.schema, e.value)) continue
    const path = e.path.split('/').slice(1).map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'))
    const found = originals.size > 0 && originals.has(e.value) ? originals.get(e.value) : e.value
    const key = path.join('/')
    if (seen.has(key)) continue
    seen.add(key)
    const own = schemaAt(schema, path)
    const parent = schemaAt(schema, path.slice(0, -1))
    // A union's check says only that no member matched (`rate_limit`: an object or null); for an
    // object or list, the one member of that shape says what is wrong inside it (before, found by
    // a review: `{"limit":0}` was answered "expected an object with the keys limit, window_s or null").
    const member = own?.[Kind] === 'Union' && found !== null && typeof found === 'object' ? memberOfShape(own, found) : undefined
    if (member !== undefined) {
      for (const p of problems(member, found, limit - out.length, object)) out.push({ ...p, path: [...path, ...p.path] })
      continue
    }
    if (own === undefined && parent?.[Kind] === 'Object') {
      const known = Object.keys(parent.properties as object)
      out.push({ path, kind: 'unknown', value: found, allowed: known.join(', '), known })
    } else if (found === undefined) {
      out.push({ path, kind: 'required', value: undefined, allowed: describeAllowed(own ?? e.schema, object) })
    } else {
      const why = typeof found === 'string' ? formatWhy(own ?? e.schema, found) : undefined
      out.push({ path, kind: 'invalid', value: found, allowed: describeAllowed(own ?? e.schema, object), ...(why !== undefined ? { why } : {}) })
    }
  }
  return out
}

/**
 * Words for a value that is no JSON value: what the YAML parser makes of `!!binary` (a Buffer),
 * `!!set` (a Set), `!!omap` (a Map) and `!!timestamp` (a Date); undefined for a JSON value (a
 * scalar, a list, a plain mapping). JSON would show a Set or Map as `{}` and a Buffer byte by byte.
 */
export function foreignValueWords(value: unknown): string | undefined {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return undefined
  const proto: unknown = Object.getPrototypeOf(value)
  if (proto === Object.prototype || proto === null) return undefined
  if (value instanceof Uint8Array) return `binary data (${value.length} bytes)`
  if (value instanceof Set) return 'a set (!!set)'
  if (value instanceof Map) return 'an ordered mapping (!!omap)'
  if (value instanceof Date) return `a timestamp (${Number.isNaN(value.getTime()) ? 'invalid' : value.toISOString()})`
  return `a ${value.constructor?.name ?? 'non-JSON'} value`
}

/** The most characters of a value a message shows. */
const SHOWN_VALUE = 80
/** What is kept past that before the scrubbing, so that a key or secret that starts within it is still found whole. */
const SECRET_ROOM = 1024
/**
 * A character a message shows escaped (JSON's `\t`, `\n`, `\r`, `\b`, `\f`, and `\uXXXX` of
 * escapeUnprintable): a key split by one is still a key to a reader, who skips over the escape,
 * and by a tab or a line break to a URL parser, which drops them. (Before, found by a review, only
 * `\t`, `\n` and `\r` were looked through: a key split by a zero-width space or a soft hyphen,
 * refused for that very character, was quoted whole but for its `\u200b`.)
 */
const SPLITTING_ESCAPES = /\\(?:[bfnrt]|u[0-9a-fA-F]{4})/g

/**
 * The first `n` characters (code points) of `text`. A cut never splits a surrogate pair: half an
 * emoji went out in JSON as a lone `\ud83d`, which strict decoders refuse, losing the whole
 * error body (found by a review).
 */
export function firstCharacters(text: string, n: number): string {
  let units = 0
  let count = 0
  for (const c of text) {
    if (count++ === n) break
    units += c.length
  }
  return text.slice(0, units)
}

/** `text` cut to `max` characters, its end shown as `...` where it was cut: a request's path or Host named in an answer or a log line. */
export function clipped(text: string, max = 200): string {
  return text.length > max && characterCount(text) > max ? firstCharacters(text, max - 3) + '...' : text
}

/**
 * Text a client sent (an id, a name, a path), as a message quotes it: scrubbed (core/log.ts), then
 * cut as `clipped` cuts it. Scrubbed first: the scrubbing of the whole message, after the cut, no
 * longer knew a key the cut had split for one, and showed its prefix, id and most of its secret
 * (found by a read-back: an id of 160 characters and then a key). Only the start is scrubbed, with
 * room for a secret that begins within what is shown (as showValue), so a long text costs no more.
 */
export function shownInput(text: string, max = 200): string {
  if (text.length <= max + SECRET_ROOM) return clipped(scrub(text), max)
  let start = text.slice(0, max + SECRET_ROOM)
  if (/[\uD800-\uDBFF]$/.test(start)) start = start.slice(0, -1)
  const shown = clipped(scrub(start), max)
  // Secrets hidden may have left what is kept shorter than max: it was cut all the same.
  return shown.endsWith('...') ? shown : `${shown}...`
}

export function showValue(value: unknown, secret = false): string {
  // A null holds no secret, and `key_hash: null` says what is wrong where `<hidden>` did not (an SQL export's empty column).
  if (secret && value !== undefined && value !== null) return '<hidden>'
  if (value === undefined) return 'nothing'
  const words = foreignValueWords(value)
  if (words !== undefined) return words
  // YAML's spelling: JSON has none for these, and wrote `.inf` as null, a value the file never had.
  // (Inside a list or mapping JSON still writes null; a leaf is shown by itself.)
  if (typeof value === 'number' && !Number.isFinite(value)) return Number.isNaN(value) ? '.nan' : value > 0 ? '.inf' : '-.inf'
  let s: string
  try {
    // Cut first, with room for a key or secret that starts within what is shown: the scrubbing
    // below took about 0.1 s per MB of a value never shown (a string body of 960 KB held the
    // admin listener's one thread 0.19 s; found by a review).
    s = escapeUnprintable((JSON.stringify(value) ?? String(value)).slice(0, SHOWN_VALUE + SECRET_ROOM))
  } catch {
    return 'a value too deeply nested to show' // RangeError: the stack ran out
  }
  // A secret where a value of another shape belongs (a key pasted as the whole body or import
  // row) is not shown either: anything shaped like a key goes, as in the log.
  s = scrub(s)
  // Nor a value holding a key split by a character shown escaped (a tab, a line break, an
  // invisible character), which a reader skips over: refused for that very character (a webhook
  // URL, a key's name), it was quoted with the key whole but for it (found by a docs walk).
  if (holdsKeyShape(s.replace(SPLITTING_ESCAPES, ''))) return '<hidden>'
  // Nor the user:password@ of a URL.
  // (Up to the last @ before the host's end: a password may hold @, spaces and quotes.)
  s = s.replace(/(\/\/)[^/?#]*@/g, '$1<hidden>@')
  // Nor the values of a URL's query, where a token is as often as before @ (`?token=`, `?code=`):
  // the names stay, to say what was there (before, found by a review, a refused upstream
  // `...?token=abc` was printed whole, on stderr and through a unit's ExecStartPre in the journal).
  s = s.replace(URL_QUERY, (_, head: string, query: string) => head + query.split('&').map(hiddenValue).join('&'))
  return clipped(s, SHOWN_VALUE)
}

/**
 * A URL's query, as JSON writes the URL: what follows its `?` up to a fragment, a quote or a space.
 * Tried from the first `//` of a run without `?`, `#`, `"` or white space only (the lookbehind finds
 * the nearest earlier `//` of the run, if any, in the time to reach it): a later `//` of the run
 * reaches the same end, a `?` or not. Before (found by a review), `/(\/\/[^\s"?#]*\?)([^\s"#]+)/g`
 * was tried from every one, in time with the square of a run of slashes: at the 1,104 characters
 * showValue keeps, an admin body refused naming 20 such values held the admin listener 121 ms
 * (bench/patterns.ts, bench/RESULTS.md).
 */
export const URL_QUERY = /(\/\/(?<!\/\/[^\s"?#]*?\/\/)[^\s"?#]*\?)([^\s"#]+)/g

/** One `name=value` piece of a query with its value hidden (a piece without `=` hidden whole). */
function hiddenValue(piece: string): string {
  if (piece === '') return piece
  const eq = piece.indexOf('=')
  return eq === -1 ? '<hidden>' : `${piece.slice(0, eq + 1)}<hidden>`
}

/** The characters of a plain key name (`database_url`, `max-age`): the schemas' own keys are spelt with them. */
const PLAIN_KEY = /^[A-Za-z0-9_-]+$/

/**
 * `p`, an unknown key, as a message may name it. In a YAML flow mapping `password:S3CR3Tpw` (no
 * space after the colon) is one key, and so are `token=S3CR3T` and `token S3CR3T`: named whole,
 * the secret was printed by `config check` and, through the unit's ExecStartPre, in the journal
 * (found by a review). A key that starts with a known one, then a character no key name has, is
 * named by that known key and a hint; where `secretSection` (the mapping holds a secret), any
 * other key that is no plain name is not named at all. A plain name is named: a misspelt key
 * must be found.
 */
export function unknownKeyShown(p: Problem, secretSection: boolean): Problem {
  const key = p.path[p.path.length - 1]
  if (p.kind !== 'unknown' || key === undefined) return p
  const at = (shown: string, hint: string): Problem => ({ ...p, path: [...p.path.slice(0, -1), shown], hint })
  const known = (p.known ?? []).find((k) => key.length > k.length && key.startsWith(k) && !PLAIN_KEY.test(key.charAt(k.length)))
  if (known !== undefined) {
    const next = key.charAt(known.length)
    if (next === ':') return at(`${known}...`, `a space is missing after "${known}:"?`)
    if (next === '=') return at(`${known}...`, `"${known}=" is no YAML key; write "${known}: VALUE"`)
    if (/\s/.test(next)) return at(`${known}...`, `a ":" is missing after "${known}"?`)
    return at(`${known}...`, 'the rest of the key is not shown')
  }
  if (secretSection && !PLAIN_KEY.test(key)) return at('<hidden>', 'not shown: it is not a plain key name, and this section holds a secret')
  return p
}

/** One line per problem: `where: <value> is not allowed; expected <allowed>`. */
export function problemLine(p: Problem, where: string, secret = false): string {
  if (p.kind === 'unknown') return `${where}: unknown key${p.hint ? ` (${p.hint})` : ''}; allowed here: ${p.allowed}`
  if (p.kind === 'required') return `${where}: is required; expected ${p.allowed}`
  if (p.why !== undefined) return `${where}: ${showValue(p.value, secret)} ${p.why}`
  return `${where}: ${showValue(p.value, secret)} is not allowed; expected ${p.allowed}`
}

/**
 * Fields whose value is a credential: a bad one is named, never shown (the message goes back to
 * the caller and may be logged by its client). `key_hash` too: the usual mistake there is the
 * legacy key itself.
 */
const SECRET_FIELD = /(?:^|\.)(?:key|token|secret|password|key_hash)$/i

/** Why a JSON number that is not finite (`1e309` reads as Infinity) is refused: JSON.stringify writes it as null. */
export const NOT_FINITE = 'is beyond the range of a number (about ±1.8e308); it would be stored as null'

/** No input keygate takes nests deeper than this (JSON bodies, metadata). */
export const MAX_JSON_DEPTH = 32

/** One step of a path, linked to the one above it (made for each object or array walked into; paths are built only for what is reported). */
interface Step {
  key: string | number
  up: Step | undefined
}

function pathTo(step: Step | undefined, last?: string | number): string[] {
  const path: string[] = last === undefined ? [] : [String(last)]
  for (let s = step; s !== undefined; s = s.up) path.push(String(s.key))
  return path.reverse()
}

/** An object or array being walked (pathWhere): its members, the next one's place, and its own step. */
interface Frame {
  readonly items: readonly unknown[] | Readonly<Record<string, unknown>>
  /** An object's keys in order; undefined for an array, walked by index. */
  readonly names: readonly string[] | undefined
  next: number
  readonly at: Step | undefined
}

/**
 * The path of the first value or object key in `value` that `bad` picks, in document order (an
 * object's keys are looked at as it is entered, before its values; an array's indexes are not
 * offered to `bad`: they are no text of the input). Walked depth first with a stack of frames of
 * its own, one per object or array open, not by recursion: a value nested tens of thousands of
 * levels deep (CLI metadata, an import file; the API refuses such bodies earlier) must reach the
 * checks that name it, not overflow. A value that is no object or array is looked at where it
 * stands, with nothing pushed or made for it: with a step and an entry pair per value, a key's
 * metadata of 480,000 numbers (within admin.max_body_bytes), walked by four checks, held the
 * admin listener's one thread for most of a second (bench/admin-body.ts).
 */
export function pathWhere(value: unknown, bad: (v: unknown) => boolean): string[] | undefined {
  if (bad(value)) return []
  if (typeof value !== 'object' || value === null) return undefined
  /** A frame for `v`, or the path of its first key `bad` picks. */
  const enter = (v: object, at: Step | undefined): Frame | { path: string[] } => {
    if (Array.isArray(v)) return { items: v, names: undefined, next: 0, at }
    const names = Object.keys(v)
    for (const k of names) if (bad(k)) return { path: pathTo(at, k) }
    return { items: v as Record<string, unknown>, names, next: 0, at }
  }
  const root = enter(value, undefined)
  if ('path' in root) return root.path
  const frames: Frame[] = [root]
  while (frames.length > 0) {
    const f = frames[frames.length - 1] as Frame
    const names = f.names
    let key: string | number
    let v: unknown
    if (names === undefined) {
      const items = f.items as readonly unknown[]
      if (f.next >= items.length) {
        frames.pop()
        continue
      }
      key = f.next++
      v = items[key]
    } else {
      if (f.next >= names.length) {
        frames.pop()
        continue
      }
      key = names[f.next++] as string
      v = (f.items as Readonly<Record<string, unknown>>)[key]
    }
    if (bad(v)) return pathTo(f.at, key)
    if (typeof v !== 'object' || v === null) continue
    const child = enter(v, { key, up: f.at })
    if ('path' in child) return child.path
    frames.push(child)
  }
  return undefined
}

/**
 * The path of the first string or object key in `value` that is not well-formed UTF-16: a lone
 * surrogate (`"\ud800"` in JSON), which is no text PostgreSQL can store (jsonb refuses it; a text
 * column would take it as U+FFFD, changing the input without a word). A key is named well-formed.
 */
export function loneSurrogateAt(value: unknown): string[] | undefined {
  return pathWhere(value, (v) => typeof v === 'string' && !v.isWellFormed())?.map((k) => k.toWellFormed())
}

/** Stands for a number that would not be stored as written, to find its path once the body is parsed. */
const CHANGED = Object.freeze({})

/**
 * A decimal number's significant digits and the power of ten of the last one (`1.50e3` is
 * ["15", 2]; any zero is ["", 0]); undefined for text that is not a JSON number.
 */
function decimalDigits(text: string): [string, number] | undefined {
  const m = /^-?(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/.exec(text)
  if (m === null) return undefined
  const whole = m[1] ?? ''
  const fraction = m[2] ?? ''
  let digits = (whole + fraction).replace(/^0+/, '')
  let exponent = Number(m[3] ?? 0) - fraction.length
  // Counted from the end: `/0*$/` tried from each zero of a run that a non-zero digit ends, a
  // time growing with the run's square (64,000 zeros in an admin body took 3.7 s; found by a review).
  let end = digits.length
  while (end > 0 && digits.charCodeAt(end - 1) === 48 /* 0 */) end--
  const zeros = digits.length - end
  digits = digits.slice(0, digits.length - zeros)
  exponent += zeros
  return digits === '' ? ['', 0] : [digits, exponent]
}

/**
 * Why the number `source` reads as `value` would not be stored as written, or undefined. What is
 * stored is the double JSON.parse reads, written back as JavaScript writes it: refused when that
 * is another number than the one sent. So out of range (`1e309` reads as Infinity, stored as
 * null), more digits than a double holds (`12345678901234567891`, or `...891.0`, is stored as
 * 12345678901234567000), or too close to zero (`1e-400` reads as 0). `0.1`, `1e20`,
 * `100000000000000000000` and `2^53` are stored as written and taken, and so is `-0` (as 0).
 */
function numberChange(value: number, source: string | undefined): string | undefined {
  if (!Number.isFinite(value)) return NOT_FINITE
  if (source === undefined) return undefined
  const sent = decimalDigits(source)
  const kept = decimalDigits(String(value))
  if (sent === undefined || kept === undefined || (sent[0] === kept[0] && sent[1] === kept[1])) return undefined
  if (value === 0) return 'is too close to zero for a number; it would be stored as 0'
  return `has more digits than a number holds (about 17); it would be stored as ${String(value)}; send it as a string`
}

/**
 * Whether JSON `text`, parsed as `value`, may hold a number changed from its literal: the reviver
 * pass below is ten times slower than a plain parse, so it runs only then. A rounded number was
 * written with more digits than a double holds (16 or more; a run of digits and points, which a
 * string may hold too: that only costs the pass); one changed to 0 came from an exponent
 * (`1e-400`) or a fraction of 300 zeros or more; one out of range is Infinity.
 */
function mayHoldChangedNumber(text: string, value: unknown): boolean {
  let long = LONG_NUMBER.test(text)
  let zeroFrom = ZERO_FROM.test(text)
  // Looked for again outside the strings, where numbers are, when found in the text: a legacy
  // key's SHA-256 hex holds 16 digits in a row about one time in 40, so nearly every import of
  // more than a few rows took the slow pass for nothing (about 0.4 s of a 10,000-row import's 1.4 s
  // holding the event loop; found by a review of the admin listener under an import).
  if (long || zeroFrom) [long, zeroFrom] = numberPatternsOutsideStrings(text)
  if (long) return true
  return pathWhere(value, (v) => typeof v === 'number' && (!Number.isFinite(v) || (v === 0 && zeroFrom))) !== undefined
}

/** A run of digits and points that may be a number with more digits than a double holds. */
const LONG_NUMBER = /\d[\d.]{15,}/
/** What may write a number that reads as 0: a negative exponent, or a fraction of 300 zeros or more. */
const ZERO_FROM = /[0-9.][eE]-|\.0{300}/

/** Whether LONG_NUMBER and ZERO_FROM are found in valid JSON `text` outside its strings (between them: the strings are jumped over). */
function numberPatternsOutsideStrings(text: string): [boolean, boolean] {
  let long = false
  let zeroFrom = false
  for (let from = 0; from < text.length && !(long && zeroFrom); ) {
    const quote = text.indexOf('"', from)
    const end = quote < 0 ? text.length : quote
    // Neither pattern fits in fewer than three characters (`,` and `:` between strings).
    if (end - from >= 3) {
      const between = text.slice(from, end)
      long ||= LONG_NUMBER.test(between)
      zeroFrom ||= ZERO_FROM.test(between)
    }
    from = quote < 0 ? text.length : stringEnd(text, quote) + 1
  }
  return [long, zeroFrom]
}

/**
 * Refuses JSON `text`, parsed as `value`, holding a number that would not be stored as written
 * (validation_failed naming its field), as a lone surrogate is: the change would be silent. The
 * admin API's bodies, and the CLI's --metadata and import files. Read again from the text with
 * JSON.parse's source access (its reviver's third argument), only when a number parsed from it
 * is suspect; after jsonProblem, as the reviver recurses and a body nested thousands of levels
 * deep overflows it.
 */
export function refuseChangedNumbers(text: string, value: unknown): void {
  if (!mayHoldChangedNumber(text, value)) return
  let found: { source: string; why: string } | undefined
  const revived: unknown = JSON.parse(text, (_key, v: unknown, context?: { source?: string }) => {
    if (found !== undefined || typeof v !== 'number') return v
    const why = numberChange(v, context?.source)
    if (why === undefined) return v
    found = { source: context?.source ?? String(v), why }
    return CHANGED
  })
  if (found === undefined) return
  // Cut as every field is: a member's name may be as long as the body (before, found by a review, shown whole).
  const field = shownField(dotted(pathWhere(revived, (v) => v === CHANGED) ?? []) || 'body')
  // Scrubbed before it is cut: a cut secret no longer matches what the scrubbing looks for.
  const source = scrub(found.source)
  const length = characterCount(source)
  const shown = length > 40 ? `${firstCharacters(source, 37)}... (${length} characters)` : source
  throw fieldInvalid(field, `${shown} ${found.why}`)
}

/** The longest field path an answer shows: a member's name may be as long as the body. */
const MAX_SHOWN_FIELD = 120

/**
 * `field` as an answer shows it: cut, with its length, past MAX_SHOWN_FIELD characters, and a lone
 * surrogate in a member's name as U+FFFD, as loneSurrogateAt names one (before, found by a review,
 * an unknown or repeated member's went out as `\ud800`, which strict JSON decoders refuse).
 */
export function shownField(field: string): string {
  // Scrubbed before it is cut: a secret pasted as a member's name, cut, no longer matched.
  const text = scrub(field).toWellFormed()
  const length = text.length > MAX_SHOWN_FIELD ? characterCount(text) : text.length
  return length > MAX_SHOWN_FIELD ? `${firstCharacters(text, MAX_SHOWN_FIELD - 3)}... (${length} characters)` : text
}

/**
 * The most members an object of a JSON input may have: none keygate takes comes near (a body's
 * fields are a few; metadata, the one free-form object, fits in 8 KiB, about 1,400 members at
 * most). It bounds the names held to find a repeated one, and refuses the body of millions of
 * members (a 31 MB import body of 2.5 million) before the walks over the parsed value, which
 * took tens of seconds over it, holding the event loop.
 */
export const MAX_JSON_MEMBERS = 10_000

/** An object or array open at a point of a JSON text. */
interface OpenValue {
  /** An object's member names so far; undefined for an array. */
  names: Set<string> | undefined
  /** In an object, whether the next string is a member's name (after `{` or `,`), not its value. */
  nameNext: boolean
  /** The member's name, or the array's index, the text is in. */
  at: string
  up: OpenValue | undefined
}

/** The index of the `"` that ends the JSON string opened at `start`: the first not escaped (after an even run of backslashes). */
function stringEnd(text: string, start: number): number {
  let i = start
  for (;;) {
    i = text.indexOf('"', i + 1)
    if (i < 0) return text.length
    let j = i - 1
    while (text.charCodeAt(j) === 0x5c) j--
    if ((i - 1 - j) % 2 === 0) return i
  }
}

/** The path of the value `open`: where the text is in each value open around it, outermost first. */
function openPath(open: OpenValue): string[] {
  const path: string[] = []
  for (let o = open.up; o !== undefined; o = o.up) path.push(o.at)
  return path.reverse()
}

/**
 * The first member of valid JSON `text` whose name repeats an earlier one of its object
 * (compared as the names read, so "a" and "\u0061" are one), or that is one past
 * MAX_JSON_MEMBERS in its object; undefined when there is none. JSON.parse keeps the last of
 * a repeated name silently, and its reviver sees only that one: the text is read once more, by a
 * loop over it that jumps over strings, holding the names of the objects open at that point.
 */
export function memberProblemAt(text: string): { path: string[]; problem: 'repeated' | 'too_many' } | undefined {
  let open: OpenValue | undefined
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c === 0x22 /* " */) {
      const end = stringEnd(text, i)
      if (open?.names !== undefined && open.nameNext) {
        const raw = text.slice(i, end + 1)
        const name = raw.includes('\\') ? (JSON.parse(raw) as string) : raw.slice(1, -1)
        if (open.names.has(name)) return { path: [...openPath(open), name], problem: 'repeated' }
        if (open.names.size >= MAX_JSON_MEMBERS) return { path: openPath(open), problem: 'too_many' }
        open.names.add(name)
        open.at = name
        open.nameNext = false
      }
      i = end
    } else if (c === 0x7b /* { */) open = { names: new Set(), nameNext: true, at: '', up: open }
    else if (c === 0x5b /* [ */) open = { names: undefined, nameNext: false, at: '0', up: open }
    else if (c === 0x7d /* } */ || c === 0x5d /* ] */) open = open?.up
    else if (c === 0x2c /* , */ && open !== undefined) {
      if (open.names !== undefined) open.nameNext = true
      else open.at = String(Number(open.at) + 1)
    }
  }
  return undefined
}

const isDigit = (c: number) => c >= 0x30 && c <= 0x39
const isHex = (c: number) => isDigit(c) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66)

/**
 * The end of the JSON string opened at `start` (the index after its closing `"`), or where it
 * stops being one (`fault`: a control character, a bad escape, or the text's end).
 */
function scanString(text: string, start: number): { next: number } | { fault: number } {
  for (let j = start + 1; j < text.length; j++) {
    const c = text.charCodeAt(j)
    if (c === 0x22 /* " */) return { next: j + 1 }
    if (c < 0x20) return { fault: j }
    if (c !== 0x5c /* \ */) continue
    j++
    if (j >= text.length) break
    if ('"\\/bfnrt'.includes(text[j] as string)) continue
    if (text[j] !== 'u') return { fault: j }
    for (let k = j + 1; k <= j + 4; k++) {
      if (k >= text.length) return { fault: text.length }
      if (!isHex(text.charCodeAt(k))) return { fault: k }
    }
    j += 4
  }
  return { fault: text.length }
}

/** The end of the JSON number that starts at `start`, or where it stops being one. */
function scanNumber(text: string, start: number): { next: number } | { fault: number } {
  let j = start
  const digits = () => {
    const from = j
    while (isDigit(text.charCodeAt(j))) j++
    return j > from
  }
  if (text[j] === '-') j++
  if (text[j] === '0') j++
  else if (!digits()) return { fault: j }
  if (text[j] === '.') {
    j++
    if (!digits()) return { fault: j }
  }
  if (text[j] === 'e' || text[j] === 'E') {
    j++
    if (text[j] === '+' || text[j] === '-') j++
    if (!digits()) return { fault: j }
  }
  return { next: j }
}

/**
 * Where `text` stops being JSON: the index of the first character no JSON text has there
 * (`text.length` where it ends too soon), or undefined when it is JSON. JSON.parse names no
 * position for an unexpected character, only some ten characters of the text either side of it:
 * an import file's problem and an admin body's are located with this (jsonFault). One pass, open
 * arrays and objects on a stack of their own, so any depth is read.
 */
export function jsonFaultAt(text: string): number | undefined {
  // What may come next: a value (or, after `[`, the array's end), a member's name (or, after
  // `{`, the object's end), a colon, a comma or the end of the value open, or nothing more.
  let want: 'value' | 'valueOrEnd' | 'name' | 'nameOrEnd' | 'colon' | 'commaOrEnd' | 'nothing' = 'value'
  const open: string[] = []
  const closed = () => (open.length === 0 ? 'nothing' : 'commaOrEnd')
  let i = 0
  while (i < text.length) {
    const c = text[i] as string
    if (c === ' ' || c === '\t' || c === '\n' || c === '\r') {
      i++
      continue
    }
    let scanned: { next: number } | { fault: number }
    if (want === 'nothing') return i
    if (want === 'colon' || want === 'commaOrEnd') {
      if (want === 'colon' && c === ':') want = 'value'
      else if (want === 'commaOrEnd' && c === ',') want = open.at(-1) === '}' ? 'name' : 'value'
      else if (want === 'commaOrEnd' && c === open.at(-1)) {
        open.pop()
        want = closed()
      } else return i
      i++
      continue
    }
    if ((want === 'nameOrEnd' && c === '}') || (want === 'valueOrEnd' && c === ']')) {
      open.pop()
      want = closed()
      i++
      continue
    }
    if (want === 'name' || want === 'nameOrEnd') {
      if (c !== '"') return i
      scanned = scanString(text, i)
      want = 'colon'
    } else if (c === '{' || c === '[') {
      open.push(c === '{' ? '}' : ']')
      want = c === '{' ? 'nameOrEnd' : 'valueOrEnd'
      i++
      continue
    } else if (c === '"') {
      scanned = scanString(text, i)
      want = closed()
    } else if (c === '-' || isDigit(c.charCodeAt(0))) {
      scanned = scanNumber(text, i)
      want = closed()
    } else {
      const word = ['true', 'false', 'null'].find((w) => w[0] === c)
      if (word === undefined) return i
      for (let k = 1; k < word.length; k++) if (text[i + k] !== word[k]) return Math.min(i + k, text.length)
      scanned = { next: i + word.length }
      want = closed()
    }
    if ('fault' in scanned) return scanned.fault
    i = scanned.next
  }
  return want === 'nothing' ? undefined : text.length
}

/** Where (from 1, in characters) and why a text is not JSON, in words that quote none of it. */
export interface JsonFault {
  why: string
  /** Absent where neither jsonFaultAt nor the parser names a position (not seen). */
  at?: { offset: number; lineStart: number; line: number; column: number }
}

/**
 * Where and why `text.slice(start)`, which JSON.parse refused with `parserMessage`, stops being
 * JSON: the line and column of `text` (lines end at LF; a column counts characters, code points)
 * and the parser's reason without the text it quotes. For an unexpected character V8 names no
 * position, only some ten characters of the text either side of it (`Unexpected token 'b',
 * "{"a": b}" is not valid JSON`), which may be a piece of a key, a secret or a key_hash: an
 * admin API's answer and an import file's problem show neither that nor the character.
 */
export function jsonFault(text: string, parserMessage: string, start = 0): JsonFault {
  const why = parserReason(parserMessage)
  const found = jsonFaultAt(start === 0 ? text : text.slice(start))
  const placed = / at position (\d+)(?: \(line \d+ column \d+\))?$/.exec(parserMessage)
  const offset = found !== undefined ? start + found : placed ? start + Number(placed[1]) : undefined
  if (offset === undefined || offset > text.length) return { why }
  const lineStart = text.lastIndexOf('\n', offset - 1) + 1
  let line = 1
  for (let i = text.indexOf('\n'); i >= 0 && i < lineStart; i = text.indexOf('\n', i + 1)) line++
  return { why, at: { offset, lineStart, line, column: characterCount(text.slice(lineStart, offset)) + 1 } }
}

/**
 * The parser's reason, without the text it quotes: "Expected ',' or '}' after property value" of
 * a message with a position, "Unexpected end of JSON input", and "Unexpected token" of every other
 * (`Unexpected token 'x', ..."text"... is not valid JSON`, `"undefined" is not valid JSON`).
 * Checked whole, so that no quoted text that looks like a position is taken for one.
 */
function parserReason(message: string): string {
  if (message === 'Unexpected end of JSON input') return message
  return /^([^"]*?)(?: in JSON)? at position \d+(?: \(line \d+ column \d+\))?$/.exec(message)?.[1] ?? 'Unexpected token'
}

/**
 * Refuses valid JSON `text` in which an object repeats a member's name, or has more than
 * MAX_JSON_MEMBERS (validation_failed naming it). JSON.parse keeps the last of a repeated name,
 * so `{"scopes":["read"],"scopes":["admin"]}` was a key with the admin scope whatever a reader of
 * the first saw; repeated headers and query parameters are refused for the same reason: a second
 * must not hide behind the first. Cheap (one pass, names held for the objects open), so it runs
 * first of the checks of a parsed body.
 */
export function refuseMemberProblems(text: string, what = 'body'): void {
  const found = memberProblemAt(text)
  if (found === undefined) return
  const field = shownField(dotted(found.path) || what)
  if (found.problem === 'repeated') throw fieldInvalid(field, 'is given more than once in its object; send each member once')
  throw fieldInvalid(field, `has more than ${MAX_JSON_MEMBERS} members; no input takes an object that large`)
}

/** Why a string with a lone surrogate is refused. */
export const LONE_SURROGATE = 'holds a lone UTF-16 surrogate (\\ud800 to \\udfff without its pair), which is not text'

/**
 * Checks `value` against `schema` and throws `validation_failed` naming the bad fields
 * (`details.fields`; the first MAX_LISTED_PROBLEMS, with `details.more` true when the check
 * stopped there), or returns it typed.
 */
export function assertValid<T>(schema: TSchema, value: unknown, what = 'body'): T {
  const found = problems(schema, value, MAX_LISTED_PROBLEMS + 1, 'object')
  if (found.length === 0) {
    const at = loneSurrogateAt(value)
    if (at === undefined) return value as T
    throw fieldInvalid(shownField(dotted(at) || what), LONE_SURROGATE)
  }
  const more = found.length > MAX_LISTED_PROBLEMS
  const fields = found.slice(0, MAX_LISTED_PROBLEMS).map((problem) => {
    const p = unknownKeyShown(problem, false)
    const path = dotted(p.path) || what
    const field = shownField(path)
    // Cut after `field: ` by length: a field's name may hold a colon.
    return { field, message: problemLine(p, field, SECRET_FIELD.test(path)).slice(field.length + 2) }
  })
  throw validationFailed(fields, more)
}

/** A field named in a `validation_failed` answer's `details.fields`. */
export interface FieldProblem {
  field: string
  message: string
}

/**
 * The `validation_failed` error naming `fields`, the first MAX_LISTED_PROBLEMS of them, its
 * message their lines and, where there were more (`more`, or more given), `and more`.
 */
export function validationFailed(given: readonly FieldProblem[], more = false): KeygateError {
  const cut = more || given.length > MAX_LISTED_PROBLEMS
  const fields = given.slice(0, MAX_LISTED_PROBLEMS)
  const lines = fields.map((f) => `${f.field}: ${f.message}`)
  if (cut) lines.push(`and more (the first ${MAX_LISTED_PROBLEMS} problems are listed)`)
  return new KeygateError('validation_failed', lines.join('; '), cut ? { fields, more: true } : { fields })
}
