// A TCP gate in front of a real server (Redis, PostgreSQL), to make the server look down or
// silent to the clients that connect through it while others reach it directly.
import net from 'node:net'
import type { Test } from 'tap'

export type GateState =
  /** Bytes pass both ways. */
  | 'open'
  /** A new connection is dropped at once: to a client, the server is down. */
  | 'shut'
  /**
   * Nothing passes either way, and every connection open now or made now stays open and says
   * nothing for good: a server or network that hangs (a host gone, a firewall dropping packets, a
   * frozen server). A client that ends its side is answered by no end of the gate's: its socket
   * stays half-closed, as one to a frozen PostgreSQL does.
   */
  | 'silent'
  /** The gate stops listening and drops every connection: a new one is refused (ECONNREFUSED), for good. */
  | 'refused'
  /**
   * As `silent` for as long as it lasts, but nothing is lost: the bytes wait in the gate and pass,
   * in order, once it is `open` again (a server frozen and thawed, a network partition healed
   * before TCP gave up). Connections stay open, and new ones are made.
   */
  | 'paused'

/** A client's connection through the gate. */
export interface GateConnection {
  /** Every byte the client sent on it so far, as latin1 text. */
  sent(): string
}

export interface TcpGate {
  port: number
  set(state: GateState): void
  /** Every byte the clients sent through the gate so far, as latin1 text (to look for what went on the wire). */
  sent(): string
  /** Connections clients made to the gate so far, in any state. */
  connections(): number
  /** Clients' connections open now, that the client has not ended (each of a pool's connections, taken or idle, is one). */
  open(): GateConnection[]
  /**
   * Cuts the one connection on which the client sends `first` and later `then` (latin1 text; the
   * gate in state `open`). `before`: the bytes holding `then` are not passed on and the connection
   * is dropped, so the server sees its client go. `after`: they are passed on, and the connection
   * is dropped when the server's answer comes, which the client never reads (a connection lost
   * between a COMMIT and its reply). Resolves once cut, after setting the gate to `next`.
   */
  cutOn(first: string, then: string, when: 'before' | 'after', next?: GateState): Promise<void>
  /**
   * The gate goes `paused` as a client sends `text` (latin1 text, in one write) on a connection
   * that is not silent, those bytes held first: a server that hangs between two statements (after
   * a connection's start-up, say). Once only.
   */
  pauseOn(text: string): void
}

const DEFAULT_PORTS: Record<string, number> = { 'postgres:': 5432, 'postgresql:': 5432, 'redis:': 6379 }

/** A gate in front of the server of `url` (on 127.0.0.1), and `url` pointed at the gate. */
export async function gateInFront(t: Pick<Test, 'teardown'>, url: string, state: GateState = 'open'): Promise<{ gate: TcpGate; url: string }> {
  const through = new URL(url)
  const gate = await tcpGate(t, Number(through.port || DEFAULT_PORTS[through.protocol]), state)
  through.port = String(gate.port)
  return { gate, url: through.href }
}

export async function tcpGate(t: Pick<Test, 'teardown'>, target: number, state: GateState = 'open'): Promise<TcpGate> {
  const sockets = new Set<net.Socket>()
  const clients = new Map<net.Socket, GateConnection>()
  // What waits in the gate while it is paused, each with where it goes, in the order it came.
  let held: Array<[net.Socket, Buffer]> = []
  // Connections that have once been silent stay so: their byte streams are broken.
  const muted = new WeakSet<net.Socket>()
  const fromClients: Buffer[] = []
  let connections = 0
  // Half-open: a client's end is passed on by hand (below), and not at all once muted.
  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    sockets.add(client)
    const mine: Buffer[] = []
    clients.set(client, { sent: () => Buffer.concat(mine).toString('latin1') })
    connections++
    client.on('error', () => {}).on('close', () => {
      sockets.delete(client)
      clients.delete(client)
    })
    client.on('end', () => {
      clients.delete(client)
      if (!muted.has(client)) client.end()
    })
    if (state === 'shut') return void client.destroy()
    client.on('data', (d: Buffer) => {
      fromClients.push(d)
      mine.push(d)
    })
    if (state === 'silent') return void muted.add(client)
    const upstream = net.connect(target, '127.0.0.1')
    sockets.add(upstream)
    let said = ''
    let armed = false
    const drop = (): void => {
      client.destroy()
      upstream.destroy()
      const c = cut
      cut = undefined
      if (c?.next !== undefined) set(c.next)
      c?.done()
    }
    for (const [a, b] of [[client, upstream], [upstream, client]] as const) {
      a.on('data', (d: Buffer) => {
        if (cut !== undefined && a === client && !armed) {
          said += d.toString('latin1')
          const from = said.indexOf(cut.first)
          if (from !== -1 && said.indexOf(cut.then, from + cut.first.length) !== -1) {
            armed = true
            if (cut.when === 'before') return drop()
          }
        }
        if (armed && a === upstream) return drop()
        if (muted.has(client)) return
        if (pauseAt !== undefined && a === client && d.toString('latin1').includes(pauseAt)) {
          pauseAt = undefined
          state = 'paused'
        }
        if (state === 'paused') held.push([b, d])
        else b.write(d)
      })
      a.on('error', () => b.destroy()).on('close', () => {
        sockets.delete(a)
        b.destroy()
      })
    }
  })
  let pauseAt: string | undefined
  let cut: { first: string; then: string; when: 'before' | 'after'; next: GateState | undefined; done: () => void } | undefined
  const set = (next: GateState): void => {
    state = next
    if (next === 'silent') for (const s of sockets) muted.add(s)
    if (next === 'open') {
      for (const [to, d] of held) if (!to.destroyed) to.write(d)
      held = []
    }
    if (next === 'refused') {
      server.close()
      for (const s of sockets) s.destroy()
    }
  }
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const socket of sockets) socket.destroy()
    server.close()
  })
  return {
    port: (server.address() as net.AddressInfo).port,
    sent: () => Buffer.concat(fromClients).toString('latin1'),
    connections: () => connections,
    open: () => [...clients.values()],
    set,
    cutOn: (first, then, when, next) => new Promise<void>((done) => void (cut = { first, then, when, next, done })),
    pauseOn: (text) => void (pauseAt = text),
  }
}
