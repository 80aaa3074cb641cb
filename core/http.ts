// Small facts about HTTP/1.1 messages that the gateway and the admin listener both read (the two
// import nothing of each other).
import type { IncomingHttpHeaders } from 'node:http'
import type { Duplex } from 'node:stream'

/** Whether a request announces a body (Content-Length other than 0, or Transfer-Encoding). */
export function hasBody(h: IncomingHttpHeaders): boolean {
  return (h['content-length'] !== undefined && h['content-length'] !== '0') || h['transfer-encoding'] !== undefined
}

/**
 * Whether a response has begun on `socket`, its head sent (Node's own clientError handler checks
 * the same): an answer written now would land inside it.
 */
export function responseInFlight(socket: Duplex): boolean {
  return (socket as Duplex & { _httpMessage?: { headersSent?: boolean } | null })._httpMessage?.headersSent === true
}

/** A Host value without its port (`[::1]:8080` is `[::1]`, `a:80` is `a`). */
export function hostName(host: string): string {
  const colon = host.lastIndexOf(':')
  return colon > host.lastIndexOf(']') ? host.slice(0, colon) : host
}
