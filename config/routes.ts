// How a route's path and host are compared: by the gateway when it matches a request, and by
// the configuration check, which refuses two routes the gateway would take for one (the first
// would win, and the second, with its scopes, would never be used).
import { asUtf8, decodeEscapes, hostName } from '../core/http.ts'

/**
 * The prefix a route's path matches as: without one trailing slash (`/api/` is `/api`); `/` as it
 * is; its non-ASCII characters (in NFC) percent-encoded as UTF-8, as clients send them (`/données`
 * is `/donn%C3%A9es`). Written as it was, such a route never matched: a request target is ASCII.
 */
export function routePrefix(path: string): string {
  const p = path.length > 1 && path.endsWith('/') ? path.slice(0, -1) : path
  return /[^\x00-\x7f]/.test(p) ? p.normalize('NFC').replace(/[^\x00-\x7f]+/g, encodeURIComponent) : p
}

/**
 * Host as routes compare it: lower case, and without the one trailing dot of a fully qualified
 * name (`admin.local.` is `admin.local`, with or without a port). Name-based virtual hosts
 * (nginx, Apache) drop that dot; kept here, `Host: admin.local.` missed the admin.local route,
 * and its scope, and was forwarded by a route for any host to the same upstream. A request's
 * Host and a route's `host` alike: a route written `admin.local.` never matched (found by a
 * review).
 */
export function canonicalHost(host: string): string {
  const lower = host.toLowerCase()
  const name = hostName(lower)
  return name.endsWith('.') ? name.slice(0, -1) + lower.slice(name.length) : lower
}

/** The Host a route matches, as requests' are compared (canonicalHost). */
export function routeHost(host: string | undefined): string | undefined {
  return host === undefined ? undefined : canonicalHost(host)
}

/**
 * The readings of a route's prefix (routePrefix) that the gateway takes for that route's when a
 * path is read leniently: in lower case, and as lenientReading reads it, without (`lenient`) and
 * with (`suffixless`) dropping a format suffix. Two routes for one host with a reading in common
 * are one route to an upstream that reads paths so; the configuration check refuses them (by the
 * suffixless reading only for two routes to one upstream). A format suffix is dropped from a
 * path's last segment only: paths under `/api/v2.1` are not `/api/v2`'s to any upstream, only
 * `/api/v2.1` itself.
 */
export function prefixReadings(prefix: string): { lower: string; lenient: string; suffixless: string } {
  if (prefix === '/') return { lower: '/', lenient: '/', suffixless: '/' }
  return { lower: prefix.toLowerCase(), lenient: lenientReading(prefix, false), suffixless: lenientReading(prefix) }
}

/**
 * Where a route's requests reach its upstream as the client sent them, under a base path: the
 * upstream's origin and the base path before the path as sent, for a route that does not strip
 * its prefix (`prefix`), or strips it to a base path that puts it back (`/admin` to
 * `http://svc/admin`: `http://svc`); undefined for any other, or an upstream that is no URL. A
 * format suffix an upstream drops leads from one route's path to another's only where both have
 * the same: that upstream sees both routes' paths as sent, under one base (before, found by a
 * review, `/admin.js` by `/` to `http://ing/frontend` was refused beside `/admin` to
 * `http://ing/admin-svc`, which strips its prefix).
 */
export function upstreamBase(upstream: string, stripPrefix: boolean, prefix: string): string | undefined {
  let url: URL
  try {
    url = new URL(upstream)
  } catch {
    return undefined
  }
  const base = url.pathname.replace(/\/$/, '')
  if (!stripPrefix || prefix === '/') return url.origin + base
  // Put back by the base path (found by a read-back: `/admin.json` by `/` went to the server that
  // `/admin`'s paths reach as sent, and Rails read it as `/admin`).
  return base.toLowerCase().endsWith(prefix.toLowerCase()) ? url.origin + base.slice(0, -prefix.length) : undefined
}

/**
 * `path` as the most lenient upstreams read it: percent-decoded (again, for those that decode
 * twice) and read as UTF-8 in NFKC (compatibility forms folded: fullwidth `ａ` is `a`, `．` is
 * `.`, as servers that fold them, IIS's best-fit mapping among them, read them), cut at a NUL (C string APIs) and at a `#` (a URL parser reads
 * `/api/admin%23/x` decoded as `/api/admin`), `\` as `/`, `;` parameters
 * dropped, `//` merged, the dots and spaces a segment ends with dropped (Windows, IIS), a format
 * suffix on the last segment dropped (`/api/admin.json` is `/api/admin` to Rails' `(.:format)` and
 * Spring's suffix patterns before 5.3), lower case. The gateway refuses a request whose path read
 * so falls under another route; the configuration check, two routes whose prefixes read so are
 * one (`formatSuffix` false: read without dropping the suffix).
 */
export function lenientReading(path: string, formatSuffix = true): string {
  return lenientReadingOf(decodeEscapes(path), formatSuffix)
}

/** lenientReading of a path whose escapes are decoded already (`bytes`, from decodeEscapes). */
export function lenientReadingOf(bytes: string, formatSuffix = true): string {
  let p = asUtf8(bytes)
  const nul = p.indexOf('\u0000')
  if (nul !== -1) p = p.slice(0, nul)
  // A decoded `#` starts a fragment to a server that decodes, then parses the path as a URL (a
  // decoded `?` starts a query, which under() reads as the end of a path already).
  const fragment = p.indexOf('#')
  if (fragment !== -1) p = p.slice(0, fragment)
  // A segment's leading spaces too: Spring's AntPathMatcher trimmed each segment before 4.3.1.
  p = p.replace(/\\/g, '/').replace(/;[^/]*/g, '').replace(/\/ +/g, '/').replace(/\/{2,}/g, '/')
  // Dot segments a second decoding made (`%252e%252e`) are resolved, as that server resolves them,
  // before a segment's trailing dots are dropped.
  if (p.includes('.')) p = resolveDots(p)
  // From a run's start only (the lookbehind): tried from each of its characters, a long run of
  // dots or spaces that no `/` ends took time with its square (a 16 KB path 0.6 s; found by a
  // review). A later start in a run ends where its start does, so what is dropped is the same.
  p = p.replace(/(?<![. ])[. ]+(?=\/|$)/g, '')
  p = foldCase(p)
  return formatSuffix ? withoutFormatSuffix(p) : p
}

/**
 * A lenient reading (lenientReadingOf's, read without the suffix) without a format suffix on its
 * last segment, read as a path without its trailing `/` (Rails strips it before matching:
 * `/api/admin.json/` is `/api/admin`; before, found by a review, the `/` hid the suffix).
 */
export function withoutFormatSuffix(reading: string): string {
  let end = reading.length
  while (end > 1 && reading.charCodeAt(end - 1) === 47 /* / */) end--
  const last = reading.lastIndexOf('/', end - 1)
  const dot = reading.indexOf('.', last + 2)
  return dot === -1 || dot >= end ? reading : reading.slice(0, dot)
}

/**
 * Lower case, and beyond ASCII as servers that compare case character by character read it (Java's
 * equalsIgnoreCase and Spring's case-insensitive matching, .NET's OrdinalIgnoreCase): each
 * character's upper case, then lower case, one for one. Dotless `ı`, long `ſ` and `İ` are then
 * `i`, `s` and `i` (lower case alone keeps the first two, and makes `İ` an `i` and a combining dot),
 * so `/admın` is `/admin`; `ß`, whose upper case is two letters, stays `ß` (before, `/strasse/x`
 * was refused beside a route of `/straße`: found by a review).
 */
function foldCase(p: string): string {
  if (!NON_ASCII.test(p)) return p.toLowerCase()
  return p.replace(/\u0130/g, 'i').replace(NON_ASCII_CHARACTERS, (c) => {
    const upper = c.toUpperCase()
    const one = upper.length === c.length ? upper : c
    const lower = one.toLowerCase()
    return lower.length === one.length ? lower : one
  }).toLowerCase()
}

const NON_ASCII = /[^\x00-\x7f]/
const NON_ASCII_CHARACTERS = /[^\x00-\x7f]/gu

/** `path` with its `.` and `..` segments resolved (RFC 3986 §5.2.4); `..` never climbs above the root. */
function resolveDots(path: string): string {
  const out: string[] = []
  const segments = path.split('/')
  for (const [i, seg] of segments.entries()) {
    if (seg === '..') {
      if (out.length > 1) out.pop()
      if (i === segments.length - 1) out.push('')
    } else if (seg === '.') {
      if (i === segments.length - 1) out.push('')
    } else out.push(seg)
  }
  return out.join('/')
}
