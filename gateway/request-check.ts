// Requests the HTTP parser accepts but a gateway must not forward: too many header lines and
// methods that are never proxied; and, as the admin listener refuses them (core/framing.ts), an
// HTTP version other than 1, a transfer coding other than chunked or in an HTTP/1.0 request, an
// Expect other than 100-continue, and a Host missing (HTTP/1.1), repeated or not a host; then, as
// it refuses them too (core/target.ts), an absolute-form target naming another host than Host, a
// fragment, dot segments that could walk out of a route's prefix, and percent-encoded control
// characters and bytes that are not UTF-8. (Paths that lenient upstreams read as another route's:
// see route.ts.) Framing attacks (both Content-Length and Transfer-Encoding, repeated or malformed
// Content-Length, bad chunking) are refused earlier by Node's strict parser; see index.ts for
// `clientError`.
import type { RequestState, Stage } from './state.ts'
import { framingProblem, hostProblem, versionProblem } from '../core/framing.ts'
import { targetProblem } from '../core/target.ts'

/**
 * The `Allow` of the gateway's 405 (RFC 9110 §15.5.6 requires one): the methods of RFC 9110 and
 * PATCH, which it forwards; it forwards any other method but CONNECT and TRACE as well (a
 * WebDAV upstream's PROPFIND, say), which it cannot list for an upstream it does not know.
 */
export const GATEWAY_ALLOW = 'GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS'

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
    const hostRefused = hostProblem(req, s.headers.host)
    if (hostRefused !== undefined) {
      s.message = hostRefused
      return 'bad_request'
    }
    const target = targetProblem(s)
    if (target !== undefined) {
      s.message = target
      return 'bad_request'
    }
    return undefined
  }
}
