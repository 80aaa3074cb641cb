// Key extraction from the configured sources, in order: `Authorization: Bearer <key>`,
// `X-API-Key: <key>`, the query parameter when enabled. Repeated headers arrive joined with
// ", " (the server runs with joinDuplicateHeaders), so a second key cannot hide in a duplicate
// line. The same key twice is fine; two different keys are a 400.
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

/** `apiKeyHeader`: the header the `x-api-key` source reads (gateway.api_key_header), as configured. */
export function createKeyExtractStage(options: { sources: readonly ('authorization' | 'x-api-key' | 'query')[]; queryParam: string; apiKeyHeader?: string }): Stage {
  const headerShown = options.apiKeyHeader ?? 'X-API-Key'
  const header = headerShown.toLowerCase()
  const order = options.sources.map((s) => (s === 'authorization' ? SOURCE_AUTHORIZATION : s === 'x-api-key' ? SOURCE_X_API_KEY : SOURCE_QUERY))
  const param = options.queryParam
  const authorizationSource = options.sources.includes('authorization')
  // Where the key goes, as this gateway takes it (before, found by a review: "An API key is
  // required." alone, beside a Bearer challenge, where only X-API-Key was taken).
  const where = options.sources.map((s) => (s === 'authorization' ? 'the Authorization header ("Bearer <key>")' : s === 'x-api-key' ? `the ${headerShown} header` : `the ${param} query parameter`))
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
