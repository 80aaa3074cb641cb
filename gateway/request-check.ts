// Requests the HTTP parser accepts but a gateway must not forward: too many header lines, an
// absolute-form target naming another host than Host, a fragment, dot segments that could walk
// out of a route's prefix, percent-encoded control characters and bytes that are not UTF-8, and
// methods that are never proxied; and, as the admin listener refuses them (core/framing.ts), an
// HTTP version other than 1, a transfer coding other than chunked or in an HTTP/1.0 request, an
// Expect other than 100-continue, and a Host missing (HTTP/1.1), repeated or not a host. (Paths
// that lenient upstreams read as another route's: see route.ts.) Framing attacks (both
// Content-Length and Transfer-Encoding, repeated or malformed Content-Length, bad chunking) are
// refused earlier by Node's strict parser; see index.ts for `clientError`.
import { isUtf8 } from 'node:buffer'
import { decodeEscapes, decodedHasDotSegments, hasDotSegments } from '../core/http.ts'
import { pathOf, type RequestState, type Stage } from './state.ts'
import { framingProblem, hostProblem, isHost, versionProblem } from '../core/framing.ts'
import { asUtf8 } from '../config/routes.ts'

// An absolute-form target's scheme and authority (all up to the path or query).
const ABSOLUTE = /^https?:\/\/[^/?\\]*/i

export function createRequestCheckStage(options: { maxHeaders: number }): Stage {
  const maxRaw = options.maxHeaders * 2
  return (s: RequestState) => {
    const req = s.req
    const version = versionProblem(req)
    if (version !== undefined) {
      s.message = version
      return 'version_not_supported'
    }
    if (req.rawHeaders.length > maxRaw) return 'headers_too_large'
    const method = req.method
    if (method === 'CONNECT' || method === 'TRACE') {
      s.message = `${method} is not supported by this gateway.`
      return 'method_not_allowed'
    }
    const framing = framingProblem(req, s.headers)
    if (framing !== undefined) {
      s.message = framing.message
      return framing.code
    }
    const host = s.headers.host
    const hostRefused = hostProblem(req, host)
    if (hostRefused !== undefined) {
      s.message = hostRefused
      return 'bad_request'
    }
    let target = s.target
    // A fragment is the client's own (RFC 9110 §4.1): never sent, so a `#` is a trick. Upstreams
    // that parse the target as a URL drop what follows it, which routing here would not.
    if (target.includes('#')) {
      s.message = 'The request target has a fragment (#).'
      return 'bad_request'
    }
    if (target.charCodeAt(0) !== 47 /* / */) {
      // Only the scheme and authority are read as a URL. The path and query are the target's own
      // text after the authority, so that the request is checked and forwarded as its origin-form
      // would be. Before, they were the URL's: re-encoded (`{a}|^` as `%7Ba%7D|%5E`, a query's
      // `'` and `"` as `%27` and `%22`, which breaks signed URLs), an empty query dropped, and dot
      // segments resolved, so `http://a/x/./y` was served as `/x/y` where `/x/./y` is refused
      // (found by a review).
      const authority = ABSOLUTE.exec(target)?.[0]
      const rest = authority === undefined ? '' : target.slice(authority.length)
      let url: URL
      try {
        // A backslash, which URL parsers read as `/`, cannot start an origin-form.
        if (authority === undefined || rest.charCodeAt(0) === 92 /* \ */) throw new Error('not an absolute-form target')
        url = new URL(authority)
      } catch {
        s.message = 'The request target is not valid.'
        return 'bad_request'
      }
      // RFC 9110 §4.2.4: userinfo in an http(s) URI is an error for a recipient to treat as such
      // (before, `http://user@x/...` was taken; found by a review).
      // (Any user or password the URL reads is before an `@` of the authority.)
      if (authority.includes('@')) {
        s.message = 'An absolute request target must not carry user information (user@).'
        return 'bad_request'
      }
      if (host === undefined) {
        // HTTP/1.0, where Host is optional (HTTP/1.1 without it is refused above): the target
        // names the host (RFC 9112 §3.2.2), and it is routed and sent upstream (X-Forwarded-Host,
        // or Host on preserve_host routes) as that Host would be. Before (found by a review), it
        // was refused as naming another host than Host, which the request did not have.
        if (!isHost(url.host)) {
          s.message = "The request target's host is not a valid host name or address."
          return 'bad_request'
        }
        s.headers.host = url.host
      } else if (url.host.toLowerCase() !== withoutDefaultPort(host.toLowerCase(), url.protocol)) {
        s.message = 'An absolute request target must name the same host as Host.'
        return 'bad_request'
      }
      // An empty path is `/` (RFC 9112 §3.2.2).
      target = rest === '' ? '/' : rest.charCodeAt(0) === 63 /* ? */ ? '/' + rest : rest
      s.target = target
    }
    if (hasDotSegments(target)) {
      s.message = 'The request path has dot segments.'
      return 'bad_request'
    }
    const path = pathOf(target)
    if (!path.includes('%')) return undefined
    s.pathBytes = decodeEscapes(path)
    // Those encoded once are found above; these only by an upstream that decodes twice (found by a review).
    if (decodedHasDotSegments(s.pathBytes)) {
      s.message = 'The request path has dot segments (percent-encoded more than once).'
      return 'bad_request'
    }
    // Fullwidth full stops (`%EF%BC%8E`) are `.` to an upstream that folds compatibility forms,
    // which the route check models (lenientReadingOf): on every route, as dots encoded twice
    // (before, found by a review, `/app/%EF%BC%8E%EF%BC%8E/api/secret` passed where routes do not nest).
    // (asUtf8 gives back a path of ASCII alone as it is.)
    const folded = asUtf8(s.pathBytes)
    if (folded !== s.pathBytes && decodedHasDotSegments(folded)) {
      s.message = 'The request path has dot segments (in a compatibility form, such as fullwidth full stops).'
      return 'bad_request'
    }
    const escapes = escapeProblem(s.pathBytes)
    if (escapes !== undefined) {
      s.message = escapes
      return 'bad_request'
    }
    return undefined
  }
}

/**
 * Why the percent-escapes of a path are refused, on every route: decoded (`bytes`, as often as
 * lenientReading decodes), they hold a `%uXXXX` escape, which IIS reads as that character (before,
 * found by a review, `/app/%u0061dmin` and `/app/x/%u002e%u002e/admin` went by `/app` to an IIS
 * that served `/app/admin`; this notation is no percent-encoding under RFC 3986, and no client
 * sends it for a real path), a control character (%00-%1F, %7F), which upstreams drop
 * (tab, CR and LF, as WHATWG URL parsers do), cut at (NUL) or trim, or bytes that are not UTF-8,
 * among them overlong forms (`%C0%AE` is a `.` to decoders that accept them, as old Tomcat and
 * IIS did: `/x/%C0%AE%C0%AE/admin` a dot segment). No path of a real resource needs either;
 * both read as another path than the one routed (before, `/api/admin%09` and `/api/admin%C0%AE`
 * went upstream under `/api`'s scope).
 */
function escapeProblem(bytes: string): string | undefined {
  if (CONTROL.test(bytes)) return 'The request path has a percent-encoded control character.'
  if (PERCENT_U.test(bytes)) return 'The request path has a %u escape (%uXXXX), which IIS decodes and other servers do not; percent-encode the character as UTF-8.'
  if (HIGH.test(bytes) && !isUtf8(Buffer.from(bytes, 'latin1'))) return 'The request path has percent-encoded bytes that are not UTF-8 (or an overlong form).'
  return undefined
}

const CONTROL = /[\x00-\x1f\x7f]/
/** `%uXXXX`, JavaScript's escape() notation, which IIS's HTTP.sys decodes by default (PercentUAllowed). */
const PERCENT_U = /%u[0-9a-f]{4}/i
const HIGH = /[\x80-\xff]/

/** `host` without the scheme's default port, as a URL's `host` leaves it out (`a:80` for http is `a`). */
function withoutDefaultPort(host: string, protocol: string): string {
  const port = protocol === 'https:' ? ':443' : ':80'
  return host.endsWith(port) ? host.slice(0, -port.length) : host
}
