// WebSocket pieces for the gateway tests: an upstream echo that speaks just enough of RFC 6455
// (small text frames, close), and a client (undici's WebSocket) that tells when its tunnel ends.
import { createHash } from 'node:crypto'
import type http from 'node:http'
import type { Duplex } from 'node:stream'
import { WebSocket } from 'undici'

/** The lines of a WebSocket offer besides Connection and Upgrade (RFC 6455 §4.1), the key of its example. */
export const WS_OFFER = 'Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n'

/** A WebSocket server's 101 to `req`, its key accepted, with `fields` (header lines, each ending in CRLF) added. */
export function switchingHead(req: http.IncomingMessage, fields = ''): string {
  const accept = createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64')
  return `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n${fields}\r\n`
}

/** Answers the upgrade with 101 and echoes small text frames; `seen` collects the upgrade requests' headers. */
export function acceptWebSocket(req: http.IncomingMessage, socket: Duplex, seen: http.IncomingHttpHeaders[] = []): void {
  seen.push(req.headers)
  socket.write(switchingHead(req))
  let buf = Buffer.alloc(0)
  socket.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d])
    while (buf.length >= 6) {
      const opcode = (buf[0] as number) & 0x0f
      const len = (buf[1] as number) & 0x7f
      if (len > 125 || buf.length < 6 + len) return
      const mask = buf.subarray(2, 6)
      const payload = Buffer.from(buf.subarray(6, 6 + len).map((b, i) => b ^ (mask[i % 4] as number)))
      buf = buf.subarray(6 + len)
      if (opcode === 0x8) {
        socket.end(Buffer.from([0x88, 0]))
        return
      }
      if (opcode === 0x1) socket.write(Buffer.concat([Buffer.from([0x81, payload.length]), payload]))
    }
  })
  // The other side went away (the gateway closed the tunnel): so does this one.
  socket.on('end', () => socket.end())
  socket.on('error', () => {})
}

export interface OpenWebSocket {
  ws: WebSocket
  /** Sends `text` and resolves with the echo, or 'no answer' after 5 s. */
  echo(text: string): Promise<string>
  /** Whether the connection has ended. */
  closed(): boolean
}

/** Opens a WebSocket through the gateway with `headers`; rejects when the upgrade is refused. */
export async function openWebSocket(url: string, headers: Record<string, string>): Promise<OpenWebSocket> {
  const ws = new WebSocket(url, { headers } as never)
  let ended = false
  ws.addEventListener('close', () => (ended = true))
  await new Promise((resolve, reject) => {
    ws.onopen = resolve
    ws.onerror = reject
  })
  return {
    ws,
    closed: () => ended,
    echo: (text) => {
      const back = new Promise<string>((resolve) => (ws.onmessage = (e) => resolve(String(e.data))))
      ws.send(text)
      return Promise.race([back, new Promise<string>((resolve) => setTimeout(() => resolve('no answer'), 5000).unref())])
    },
  }
}
