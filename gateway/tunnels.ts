// Open WebSocket tunnels, and the end of one whose checks no longer pass. An upgrade is checked
// once, like any request, but its tunnel can stay open for days: without this, a revoked key or a
// deny-listed address would keep every socket it already had. A tunnel is closed (both sockets,
// no WebSocket close frame: the gateway does not speak the protocol inside) when
// - its key is revoked, expired, past its rotation grace or deleted, no longer bound to the
//   tunnel's address, or no longer holds a scope the route needs: checked against the store when
//   the key changes (in this process, or in another one with Redis), at the moment its expiry or
//   grace ends, and every `cache.ttl_s` (how stale a cached answer may be without Redis);
// - its address is deny-listed: checked whenever the deny list changes or is reloaded.
// A store that cannot be read keeps the tunnel open (as a cached key keeps working) and is asked
// again 5 s later; an expiry or grace already known to have passed ends the tunnel without it.
import { evaluateKey, validUntilOf } from '../core/keys/evaluate.ts'
import type { KeyService } from '../core/keys/service.ts'
import type { KeyRecord } from '../core/keys/types.ts'
import type { Logger } from '../core/log.ts'
import { grants, type CompiledRoute } from './route.ts'

export interface Tunnel {
  readonly keyId: string
  readonly address: string
  readonly route: CompiledRoute
  readonly requestId: string
  /** Ends the tunnel (both sockets). */
  close(): void
}

interface Held {
  tunnel: Tunnel
  timer: NodeJS.Timeout | undefined
  /** When the key's expiry or grace ends, as last read (epoch ms). */
  validUntil: number
}

/** Node's timers hold at most 2^31-1 ms (about 24.8 days); a later end is re-armed on the way. */
const LONGEST_TIMER_MS = 2 ** 31 - 1
/** After a failed store read, the next try for that key (instead of waiting for the sweep). */
const RETRY_MS = 5000
/** Keys read in one query by a sweep. */
const BATCH = 500

export interface TunnelGuardOptions {
  keys: Pick<KeyService, 'getMany'>
  now: () => number
  log: Logger
  /** How often every tunnel's key is read again (ms). */
  recheckMs: number
  /** Whether the deny list refuses an address now. */
  denied: (address: string) => boolean
}

export class TunnelGuard {
  readonly #o: TunnelGuardOptions
  readonly #byKey = new Map<string, Map<Tunnel, Held>>()
  /** Key ids being read, and whether another check was asked for meanwhile. */
  readonly #checking = new Map<string, boolean>()
  readonly #sweep: NodeJS.Timeout
  #changes = 0

  constructor(o: TunnelGuardOptions) {
    this.#o = o
    this.#sweep = setInterval(() => this.recheckAll(), Math.max(1000, o.recheckMs))
    this.#sweep.unref()
  }

  /** Counts the key changes seen: an upgrade takes it before it asks the upstream, and hands it to `opened`. */
  get changes(): number {
    return this.#changes
  }

  /**
   * A tunnel just opened with a key the checks passed; `validUntil` is when its expiry or grace
   * ends (epoch ms, Infinity for never), `changesBefore` the count of changes when the upgrade
   * was checked. A key that changed while the upstream answered the upgrade is read again at
   * once: its change found no tunnel to check then.
   */
  opened(tunnel: Tunnel, validUntil: number, changesBefore: number): void {
    let held = this.#byKey.get(tunnel.keyId)
    if (held === undefined) this.#byKey.set(tunnel.keyId, (held = new Map()))
    const h: Held = { tunnel, timer: undefined, validUntil }
    held.set(tunnel, h)
    this.#arm(h, validUntil)
    if (this.#changes !== changesBefore) this.keyChanged(tunnel.keyId)
    // The same for a deny list change made meanwhile (its check found no tunnel either).
    if (this.#o.denied(tunnel.address)) this.#end(h, 'address deny-listed')
  }

  /** The tunnel ended (either side closed it, or this guard did). */
  ended(tunnel: Tunnel): void {
    const held = this.#byKey.get(tunnel.keyId)
    const h = held?.get(tunnel)
    if (held === undefined || h === undefined) return
    clearTimeout(h.timer)
    held.delete(tunnel)
    if (held.size === 0) this.#byKey.delete(tunnel.keyId)
  }

  /** The key changed somewhere: read it again and end the tunnels it no longer allows. */
  keyChanged(id: string): void {
    this.keysChanged([id])
  }

  /**
   * These keys changed (an import, a scheduler round, a burst of messages): those with tunnels
   * are read again in batches of one query each, not a query per key.
   */
  keysChanged(ids: Iterable<string>): void {
    this.#changes++
    const claimed: string[] = []
    for (const id of ids) if (this.#claim(id)) claimed.push(id)
    for (let i = 0; i < claimed.length; i += BATCH) void this.#check(claimed.slice(i, i + BATCH))
  }

  /** Every key with tunnels, read again (the sweep, a flush). */
  recheckAll(): void {
    this.keysChanged([...this.#byKey.keys()])
  }

  /** Whether `id` is to be read now: it has tunnels and no read of it is in flight (one in flight reads again after). */
  #claim(id: string): boolean {
    if (!this.#byKey.has(id)) return false
    if (this.#checking.has(id)) {
      this.#checking.set(id, true)
      return false
    }
    this.#checking.set(id, false)
    return true
  }

  /** The deny list changed or was reloaded: end the tunnels of addresses it now denies. */
  denyChanged(): void {
    for (const held of [...this.#byKey.values()]) {
      for (const h of [...held.values()]) {
        if (this.#o.denied(h.tunnel.address)) this.#end(h, 'address deny-listed')
      }
    }
  }

  /** Ends the checks (the tunnels themselves are closed by the forwarder). */
  stop(): void {
    clearInterval(this.#sweep)
    for (const held of this.#byKey.values()) for (const h of held.values()) clearTimeout(h.timer)
    this.#byKey.clear()
  }

  #arm(h: Held, validUntil: number, retryMs = Infinity): void {
    clearTimeout(h.timer)
    h.timer = undefined
    h.validUntil = validUntil
    const wait = Math.min(LONGEST_TIMER_MS, retryMs, Math.max(0, validUntil - this.#o.now()))
    if (wait === Infinity) return
    h.timer = setTimeout(() => this.keyChanged(h.tunnel.keyId), wait)
    h.timer.unref()
  }

  async #check(ids: readonly string[]): Promise<void> {
    try {
      let records: Map<string, KeyRecord>
      try {
        records = await this.#o.keys.getMany(ids)
      } catch (err) {
        // What is known without the store still holds: an expiry or grace that has passed ends
        // the tunnel (as it refuses a cached key). The others are read again soon.
        this.#o.log.warn('could not read the keys of open WebSocket tunnels; trying again', { key_ids: ids.length, err: err as Error })
        const now = this.#o.now()
        for (const id of ids) {
          for (const h of [...(this.#byKey.get(id)?.values() ?? [])]) {
            if (now >= h.validUntil) this.#end(h, 'expired')
            else this.#arm(h, h.validUntil, RETRY_MS)
          }
        }
        return
      }
      const now = this.#o.now()
      for (const id of ids) {
        const held = this.#byKey.get(id)
        if (held === undefined) continue
        const record = records.get(id)
        const validUntil = record === undefined ? 0 : validUntilOf(record)
        for (const h of [...held.values()]) {
          const reason = record === undefined ? 'deleted' : refusal(record, h.tunnel, now)
          if (reason !== undefined) this.#end(h, reason)
          else this.#arm(h, validUntil)
        }
      }
    } finally {
      const again = ids.filter((id) => this.#checking.get(id) === true)
      for (const id of ids) this.#checking.delete(id)
      if (again.length > 0) this.keysChanged(again)
    }
  }

  #end(h: Held, reason: string): void {
    this.ended(h.tunnel)
    this.#o.log.info('closed a WebSocket tunnel: its checks no longer pass', { request_id: h.tunnel.requestId, key_id: h.tunnel.keyId, route: h.tunnel.route.name, reason })
    h.tunnel.close()
  }
}

function refusal(record: KeyRecord, tunnel: Tunnel, nowMs: number): string | undefined {
  const verdict = evaluateKey(record, new Date(nowMs), tunnel.address)
  if (!verdict.ok) return verdict.reason
  if (tunnel.route.scopes.length > 0 && !grants(record.scopes, tunnel.route.scopes)) return 'scope_denied'
  return undefined
}
