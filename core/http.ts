// Small facts about HTTP/1.1 messages that the gateway and the admin listener both read (the two
// import nothing of each other).
import type { IncomingHttpHeaders, Server } from 'node:http'
import type { Socket } from 'node:net'
import type { Duplex } from 'node:stream'

/** The header every answer of the admin listener carries (the CLI takes no other server's JSON for the admin API's). */
export const ADMIN_MARK = 'x-keygate-admin'

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

const tracked = new WeakMap<Server, Set<Socket>>()

/**
 * Keeps the raw connections of `server`, from their first byte: `closeAllConnections` reaches
 * only those the HTTP layer has taken over, so a TLS connection still in its handshake (a client
 * that connected and sent nothing) would hold a shutdown open for as long as the client liked.
 */
export function trackConnections(server: Server): void {
  if (tracked.has(server)) return
  const sockets = new Set<Socket>()
  tracked.set(server, sockets)
  server.on('connection', (socket: Socket) => {
    sockets.add(socket)
    socket.once('close', () => sockets.delete(socket))
  })
}

/** Ends every connection of `server` now: the HTTP ones, and (when tracked) those still in their TLS handshake. */
export function destroyConnections(server: Server): void {
  server.closeAllConnections()
  for (const socket of tracked.get(server) ?? []) socket.destroy()
}

/**
 * Whether a `clientError` is the TLS layer's (a handshake that timed out or failed, plain HTTP
 * sent to a TLS port): https servers report those as `clientError` too, and no HTTP answer can
 * be written on a connection without a handshake (one queued there waits for ever).
 */
export function isTlsFailure(err: NodeJS.ErrnoException): boolean {
  return typeof err.code === 'string' && /^ERR_(SSL|TLS)_/.test(err.code)
}
