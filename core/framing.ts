// The checks of a request head that Node's HTTP parser leaves to the server, made alike by both
// listeners: the gateway's request check (gateway/request-check.ts) and the admin listener
// (admin/server.ts). The parser takes a request line of any HTTP version, any transfer coding
// that ends with chunked, a Transfer-Encoding in an HTTP/1.0 request, an Expect naming
// 100-continue among others, and a Host that is not a host; what it refuses itself (both
// Content-Length and Transfer-Encoding, a repeated or malformed Content-Length, obsolete line
// folding, bad chunking) is answered by each listener's `clientError`. Before (found by a
// review), only the gateway made these checks: the admin listener answered `GET /v1/keys
// HTTP/2.0` 200, and read a `gzip, chunked` body with only its chunking undone.
import type { IncomingHttpHeaders, IncomingMessage } from 'node:http'
import { clipped } from './validate.ts'

/** A request head refused: the code, and what to say instead of the catalogue's message. */
export interface HeadRefusal {
  code: 'transfer_coding_not_supported' | 'expectation_failed' | 'bad_request'
  message: string | undefined
}

// Host as RFC 9110 §7.2 has it, `uri-host [ ":" port ]`: a bracketed IP literal, or a name of
// RFC 3986's reg-name characters (a comma is a repeated Host, refused apart).
const HOST = /^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]+)(?::[0-9]*)?$/

/** Whether `host` is a Host value: a host name or address, with an optional port. */
export function isHost(host: string): boolean {
  return HOST.test(host)
}

/**
 * Why the request's HTTP version is refused (`version_not_supported`), if it is. Node's parser
 * takes `HTTP/2.0` and `HTTP/0.9` (a request line without a version too) and hands them over as
 * any other: the gateway forwarded them upstream as HTTP/1.1 (found by a review). RFC 9110
 * §15.6.6: 505 for a major version the server does not speak. The answer closes the connection:
 * what such a client sends next is not HTTP/1 framing.
 */
export function versionProblem(req: IncomingMessage): string | undefined {
  return req.httpVersionMajor === 1 ? undefined : `HTTP/${req.httpVersion} is not supported; send HTTP/1.1 (or HTTP/1.0).`
}

/** Why the framing of the request's body, or its Expect, is refused, if it is (`headers`: `req.headers`, read once). */
export function framingProblem(req: IncomingMessage, headers: IncomingHttpHeaders): HeadRefusal | undefined {
  const te = headers['transfer-encoding']
  // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing. Node's parser
  // read its body as chunked and kept the connection, where a proxy in front that reads it as
  // HTTP/1.0 ends the request at its head and takes the chunks for requests of their own (found
  // by a review). Refused as nginx refuses it; the refusal closes the connection (its body unread).
  if (te !== undefined && req.httpVersionMinor === 0) {
    return { code: 'bad_request', message: 'An HTTP/1.0 request must not have a Transfer-Encoding (RFC 9112 §6.1): send HTTP/1.1, or a Content-Length.' }
  }
  // Node's parser takes any transfer coding that ends with chunked, and undoes only the
  // chunking: `gzip, chunked` went upstream as its gzip bytes, with the only header that said
  // so dropped as hop-by-hop (found by a review). RFC 9112 §6.1: 501 for a coding not understood.
  if (te !== undefined && te !== 'chunked' && te.trim().toLowerCase() !== 'chunked') {
    return { code: 'transfer_coding_not_supported', message: `The request body's Transfer-Encoding (${clipped(te, 63)}) is not supported: send it chunked only, with a Content-Encoding for a compressed body.` }
  }
  // Node hands an Expect that names 100-continue among others (`100-continue, foo`) over as a
  // 100-continue, and the gateway sent the 100 and forwarded it (found by a review): an
  // expectation it does not meet is 417, as an Expect without 100-continue is (Node's
  // 'checkExpectation'). An HTTP/1.0 request's Expect is ignored (RFC 9110 §10.1.1).
  const expect = headers.expect
  if (expect !== undefined && expect !== '100-continue' && req.httpVersionMinor === 1 && expect.trim().toLowerCase() !== '100-continue') {
    return { code: 'expectation_failed', message: undefined }
  }
  return undefined
}

/**
 * Why the request's Host is refused (`bad_request`, RFC 9112 §3.2), if it is: missing from an
 * HTTP/1.1 request, repeated (the listeners join a repeated header's lines with a comma), or not
 * a host. A Host that is not a host would reach an upstream as X-Forwarded-Host, or as Host on
 * preserve_host routes; an HTTP/1.0 request may have none.
 */
export function hostProblem(req: IncomingMessage, host: string | undefined): string | undefined {
  if (host === undefined) return req.httpVersionMinor === 1 ? 'Host is required.' : undefined
  if (host.includes(',')) return 'Host is repeated.'
  if (!HOST.test(host)) return host === '' ? 'Host is empty.' : 'Host is not a valid host name or address.'
  return undefined
}
