// The checks of a request target, made alike by both listeners: the gateway's request check
// (gateway/request-check.ts) and the admin listener (admin/server.ts), each after its checks of
// the request head (core/framing.ts). A fragment, an absolute-form target whose host is not Host's
// or that carries user information, dot segments (also percent-encoded, once or more, or in
// fullwidth full stops), and a path with a percent-encoded control character, a %u escape or
// bytes that are not UTF-8 are refused (`bad_request`); an absolute-form target is taken as its
// origin-form. Before (found by a review), only the gateway made these checks: the admin listener
// served `GET /v1/keys#x` as `/v1/keys`, decoded `/v1/keys/a%09b` into the id "a\tb", and refused
// `GET http://127.0.0.1/v1/keys`, which RFC 9112 §3.2.2 has a server accept.
import { isUtf8 } from 'node:buffer'
import type { IncomingHttpHeaders } from 'node:http'
import { isHost } from './framing.ts'
import { asUtf8, decodeEscapes, decodedHasDotSegments, hasDotSegments } from './http.ts'

/** A request's target as the check reads and rewrites it (the gateway's request state is one). */
export interface RequestTarget {
  /** The target as received; the check leaves its origin-form (path and query). */
  target: string
  /** Set by the check when the path holds a `%`: its escapes decoded (decodeEscapes). */
  pathBytes: string | undefined
  /** The request's headers: an HTTP/1.0 request without Host is given its absolute-form target's host as Host. */
  readonly headers: IncomingHttpHeaders
}

// An absolute-form target's scheme and authority (all up to the path or query).
const ABSOLUTE = /^https?:\/\/[^/?\\]*/i

/**
 * Why the request target of `r` is refused (`bad_request`), if it is; otherwise `r.target` is its
 * origin-form, `r.pathBytes` its path's escapes decoded (when it has any), and an HTTP/1.0 request
 * without Host has the host its absolute-form target names as Host. The Host itself has been
 * checked before (hostProblem).
 */
export function targetProblem(r: RequestTarget): string | undefined {
  let target = r.target
  // A fragment is the client's own (RFC 9110 §4.1): never sent, so a `#` is a trick. Upstreams
  // that parse the target as a URL drop what follows it, which routing here would not.
  if (target.includes('#')) return 'The request target has a fragment (#).'
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
      return 'The request target is not valid.'
    }
    // RFC 9110 §4.2.4: userinfo in an http(s) URI is an error for a recipient to treat as such
    // (before, `http://user@x/...` was taken; found by a review).
    // (Any user or password the URL reads is before an `@` of the authority.)
    if (authority.includes('@')) return 'An absolute request target must not carry user information (user@).'
    const host = r.headers.host
    if (host === undefined) {
      // HTTP/1.0, where Host is optional (HTTP/1.1 without it is refused before): the target
      // names the host (RFC 9112 §3.2.2), and the request is taken as that Host's (at the gateway,
      // routed and sent upstream, as X-Forwarded-Host or Host on preserve_host routes; at the
      // admin listener, checked against its allowed hosts). Before (found by a review), it was
      // refused as naming another host than Host, which the request did not have.
      if (!isHost(url.host)) return "The request target's host is not a valid host name or address."
      r.headers.host = url.host
    } else if (url.host.toLowerCase() !== withoutDefaultPort(host.toLowerCase(), url.protocol)) {
      return 'An absolute request target must name the same host as Host.'
    }
    // An empty path is `/` (RFC 9112 §3.2.2).
    target = rest === '' ? '/' : rest.charCodeAt(0) === 63 /* ? */ ? '/' + rest : rest
    r.target = target
  }
  if (hasDotSegments(target)) return 'The request path has dot segments.'
  const q = target.indexOf('?')
  const path = q === -1 ? target : target.slice(0, q)
  if (!path.includes('%')) return undefined
  const bytes = decodeEscapes(path)
  r.pathBytes = bytes
  // Those encoded once are found above; these only by an upstream that decodes twice (found by a review).
  if (decodedHasDotSegments(bytes)) return 'The request path has dot segments (percent-encoded more than once).'
  // Fullwidth full stops (`%EF%BC%8E`) are `.` to an upstream that folds compatibility forms,
  // which the gateway's route check models (lenientReadingOf): on every route, as dots encoded
  // twice (before, found by a review, `/app/%EF%BC%8E%EF%BC%8E/api/secret` passed where routes
  // do not nest). (asUtf8 gives back a path of ASCII alone as it is.)
  const folded = asUtf8(bytes)
  if (folded !== bytes && decodedHasDotSegments(folded)) return 'The request path has dot segments (in a compatibility form, such as fullwidth full stops).'
  return escapeProblem(bytes)
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

/** A control character (C0, DEL): refused in a request path, percent-encoded too (the CLI does not send one: cli/admin-client.ts). */
export const CONTROL = /[\x00-\x1f\x7f]/
/** `%uXXXX`, JavaScript's escape() notation, which IIS's HTTP.sys decodes by default (PercentUAllowed). */
const PERCENT_U = /%u[0-9a-f]{4}/i
const HIGH = /[\x80-\xff]/

/** `host` without the scheme's default port, as a URL's `host` leaves it out (`a:80` for http is `a`). */
function withoutDefaultPort(host: string, protocol: string): string {
  const port = protocol === 'https:' ? ':443' : ':80'
  return host.endsWith(port) ? host.slice(0, -port.length) : host
}
