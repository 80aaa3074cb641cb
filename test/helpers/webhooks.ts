// A real webhook receiver for tests (node:http on port 0) and a verifier of the Standard
// Webhooks signature scheme written here from the convention itself, not with keygate's code:
// the signed content is "<webhook-id>.<webhook-timestamp>.<body>", HMAC-SHA256 keyed with the
// base64 part of the `whsec_` secret, each signature `v1,<base64>`, several separated by spaces.
import { createHmac, timingSafeEqual } from 'node:crypto'
import http from 'node:http'
import { listen, type Tap } from './gateway.ts'

export interface Hook {
  id: string
  timestamp: string
  signature: string
  body: string
  json: any
  headers: http.IncomingHttpHeaders
  path: string
}

export interface Receiver {
  url: string
  port: number
  received: Hook[]
  /** Resolves with the first hook (already received or to come) that `match` accepts. */
  waitFor(match: (h: Hook) => boolean): Promise<Hook>
}

export type Respond = (hook: Hook, res: http.ServerResponse) => void

/** Every port a receiver of this process was given. */
const portsGiven = new Set<number>()

/**
 * A receiver on a port no receiver of this process had before: the webhooks of a receiver that
 * is gone are still registered in the store a test file shares between its subtests, and one
 * given that port again got their deliveries too (seen: a receiver counting 7 attempts where its
 * own webhook could make 5). A port given before is held, answering 410 to anything, until the
 * test ends, so that it is not given again meanwhile.
 */
export async function startReceiver(t: Tap, respond: Respond = (_h, res) => res.writeHead(204).end()): Promise<Receiver> {
  for (;;) {
    const server = http.createServer()
    const port = await listen(server)
    t.teardown(() => {
      server.closeAllConnections()
      return new Promise((r) => server.close(r))
    })
    if (!portsGiven.has(port)) {
      portsGiven.add(port)
      return receiverOn(server, port, respond)
    }
    server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => req.resume().on('end', () => res.writeHead(410).end()))
  }
}

function receiverOn(server: http.Server, port: number, respond: Respond): Receiver {
  const received: Hook[] = []
  const waiting: Array<{ match: (h: Hook) => boolean; resolve: (h: Hook) => void }> = []
  server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8')
      let json: unknown
      try {
        json = JSON.parse(body)
      } catch {}
      const hook: Hook = {
        id: String(req.headers['webhook-id'] ?? ''),
        timestamp: String(req.headers['webhook-timestamp'] ?? ''),
        signature: String(req.headers['webhook-signature'] ?? ''),
        body,
        json,
        headers: req.headers,
        path: req.url ?? '',
      }
      received.push(hook)
      for (const w of [...waiting]) {
        if (w.match(hook)) {
          waiting.splice(waiting.indexOf(w), 1)
          w.resolve(hook)
        }
      }
      respond(hook, res)
    })
  })
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    received,
    waitFor(match) {
      const found = received.find(match)
      if (found) return Promise.resolve(found)
      return new Promise((resolve) => waiting.push({ match, resolve }))
    },
  }
}

/** Which of `secrets` produced a signature in the hook's header (Standard Webhooks, v1). */
export function verifiedBy(hook: Hook, secrets: readonly string[], toleranceS = 300, nowS = Math.floor(Date.now() / 1000)): string[] {
  if (!/^msg_[A-Za-z0-9]+$/.test(hook.id)) return []
  const ts = Number(hook.timestamp)
  if (!Number.isInteger(ts) || Math.abs(nowS - ts) > toleranceS) return []
  const presented = hook.signature
    .split(' ')
    .filter((s) => s.startsWith('v1,'))
    .map((s) => Buffer.from(s.slice(3), 'base64'))
  return secrets.filter((secret) => {
    if (!secret.startsWith('whsec_')) return false
    const expected = createHmac('sha256', Buffer.from(secret.slice(6), 'base64')).update(`${hook.id}.${hook.timestamp}.${hook.body}`).digest()
    return presented.some((p) => p.length === expected.length && timingSafeEqual(p, expected))
  })
}
