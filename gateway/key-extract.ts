// Key extraction from the configured sources, in order: `Authorization: Bearer <key>`,
// `X-API-Key: <key>`, the query parameter when enabled. Repeated headers arrive joined with
// ", " (the server runs with joinDuplicateHeaders), so a second key cannot hide in a duplicate
// line. The same key twice is fine; two different keys are a 400.
import { headerReading } from '../core/http.ts'
import type { RequestState, Stage } from './state.ts'

export const SOURCE_AUTHORIZATION = 1
export const SOURCE_X_API_KEY = 2
export const SOURCE_QUERY = 4

const BEARER = /^\s*bearer\s+(\S+)\s*$/i

/** `Bearer <token>` exactly (the common form): the token, read without a regular expression; else undefined. */
function plainBearer(value: string): string | undefined {
  if (value.length < 8 || value.charCodeAt(6) !== 32 /* space */) return undefined
  const scheme = value.slice(0, 6)
  if (scheme !== 'Bearer' && scheme.toLowerCase() !== 'bearer') return undefined
  const token = value.slice(7)
  // Anything else (more spaces, tabs, a space inside) goes through BEARER.
  return /\s/.test(token) ? undefined : token
}

// A part of a comma-joined line that is one token and no scheme: after a Bearer part, another
// token of that Bearer (`Bearer k1, k2`), so a second key cannot hide there either.
const BARE_TOKEN = /^\s*(\S+)\s*$/

function bearerTokens(value: string): string | string[] | undefined {
  if (!value.includes(',')) return plainBearer(value) ?? BEARER.exec(value)?.[1]
  const out: string[] = []
  let afterBearer = false
  for (const part of value.split(',')) {
    const t: string | undefined = BEARER.exec(part)?.[1] ?? (afterBearer ? BARE_TOKEN.exec(part)?.[1] : undefined)
    afterBearer = t !== undefined || (afterBearer && part.trim() === '')
    if (t !== undefined) out.push(t)
  }
  return out
}

function listValues(value: string): string | string[] | undefined {
  if (!value.includes(',')) {
    const v = value.trim()
    return v === '' ? undefined : v
  }
  return value.split(',').map((v) => v.trim()).filter((v) => v !== '')
}

const NOT_BEARER = 'An API key is required: the Authorization header holds no Bearer credential; send the key as "Authorization: Bearer <key>".'

function twoKeys(s: RequestState): 'bad_request' {
  s.message = 'The request carries more than one API key.'
  return 'bad_request'
}

export type KeySourceName = 'authorization' | 'x-api-key' | 'query'

/**
 * Where this gateway takes a key (gateway.key_sources, api_key_header, query_param), worked out
 * once for all that read a request's credential: the key extraction, the CORS preflight stage
 * (which lets only a request without one pass keyless) and the forwarder (which removes it).
 */
export interface KeySources {
  /** The sources, in the order they are read. */
  readonly names: readonly KeySourceName[]
  readonly authorization: boolean
  /** The API key header as configured (X-API-Key when not given), for messages. */
  readonly headerShown: string
  /** That header's name as Node gives it (lower case), when it is a source. */
  readonly header: string | undefined
  /** The query parameter (gateway.query_param), a source or not. */
  readonly queryParam: string
  readonly query: boolean
}

export function keySources(options: { sources: readonly KeySourceName[]; queryParam: string; apiKeyHeader?: string | undefined }): KeySources {
  const headerShown = options.apiKeyHeader ?? 'X-API-Key'
  return {
    names: options.sources,
    authorization: options.sources.includes('authorization'),
    headerShown,
    header: options.sources.includes('x-api-key') ? headerShown.toLowerCase() : undefined,
    queryParam: options.queryParam,
    query: options.sources.includes('query'),
  }
}

/**
 * Whether `name`, a header name as Node gives it, is the API key header in some spelling: CGI,
 * WSGI and PHP read `_` (lighttpd `.` and the rest too) as `-`, so `x_api_key` and `x.api.key`
 * reach them as the same variable (headerReading).
 */
export function isApiKeyHeader(sources: KeySources, name: string): boolean {
  // The configured name is its own reading: letters, digits and `-` only (the api-key-header format).
  return sources.header !== undefined && headerReading(name) === sources.header
}

export function createKeyExtractStage(sources: KeySources): Stage {
  const { headerShown, queryParam: param, authorization: authorizationSource } = sources
  // Read only when the API key header is a source.
  const header = sources.header ?? ''
  const order = sources.names.map((s) => (s === 'authorization' ? SOURCE_AUTHORIZATION : s === 'x-api-key' ? SOURCE_X_API_KEY : SOURCE_QUERY))
  // Where the key goes, as this gateway takes it (before, found by a review: "An API key is
  // required." alone, beside a Bearer challenge, where only X-API-Key was taken).
  const where = sources.names.map((s) => (s === 'authorization' ? 'the Authorization header ("Bearer <key>")' : s === 'x-api-key' ? `the ${headerShown} header` : `the ${param} query parameter`))
  const missing = `An API key is required: send it in ${where.length > 1 ? `${where.slice(0, -1).join(', ')} or ${where.at(-1)}` : where[0]}.`

  const valuesOf = (s: RequestState, source: number): string | string[] | undefined => {
    const h = s.headers
    if (source === SOURCE_AUTHORIZATION) return h.authorization === undefined ? undefined : bearerTokens(h.authorization)
    if (source === SOURCE_X_API_KEY) {
      const v = h[header]
      return v === undefined ? undefined : listValues(typeof v === 'string' ? v : v.join(','))
    }
    const q = s.target.indexOf('?')
    if (q === -1) return undefined
    const all = new URLSearchParams(s.target.slice(q + 1)).getAll(param).filter((v) => v !== '')
    return all.length === 0 ? undefined : all
  }

  return (s: RequestState) => {
    let key: string | undefined
    let bits = 0
    for (let i = 0; i < order.length; i++) {
      const source = order[i] as number
      const found = valuesOf(s, source)
      if (found === undefined) continue
      if (typeof found === 'string') {
        if (key !== undefined && key !== found) return twoKeys(s)
        key = found
        bits |= source
        continue
      }
      for (const v of found) {
        if (key !== undefined && key !== v) return twoKeys(s)
        key = v
        bits |= source
      }
    }
    if (key === undefined) {
      // An Authorization header without a Bearer credential (`Authorization: kg_...`, a Basic
      // one): the answer says how to send the key, where "required" alone read as if none had
      // been sent (found by a newcomer). Nothing of the header is echoed.
      s.message = authorizationSource && s.headers.authorization !== undefined ? NOT_BEARER : missing
      return 'key_missing'
    }
    s.presented = key
    s.keySources = bits
    return undefined
  }
}
