// The client address (SPEC §3): the socket peer, or — when the peer is a trusted proxy — the
// right-most address in X-Forwarded-For that is not itself a trusted proxy. Addresses are
// normalised (IPv4-mapped IPv6 becomes IPv4); IPv6 clients are counted per network
// (`rate_limits.ipv6_prefix_bits`) for limits and lockouts, since one host holds a whole /64.
import type { Socket } from 'node:net'
import { withoutOws } from '../core/http.ts'
import { normalAddress, parseAddress, rangeMatcher } from '../core/keys/evaluate.ts'
import { addressKeyer } from '../core/lockout.ts'
import { oncePer, type Logger } from '../core/log.ts'
import type { RequestState, Stage } from './state.ts'

interface Peer {
  address: string
  key: string
  trusted: boolean
  /**
   * The X-Forwarded-For last seen on this connection and the client it named (a proxy's keep-alive
   * connection mostly repeats one): only one of at most MEMO_XFF_CHARS, as any proxy writes.
   */
  lastXff: string | undefined
  lastClient: string
  lastClientKey: string
  /** Whether this connection's first request was looked at for a proxy not in trusted_proxies (see UNTRUSTED_PROXY_RANGES). */
  proxyChecked: boolean
}

const kPeer = Symbol('keygate.peer')
type PeerSocket = Socket & { [kPeer]?: Peer }

/**
 * The longest X-Forwarded-For a connection remembers between its requests. A chain of proxies
 * writes a few addresses; a longer value is the client's own hops passed along, read each time.
 * Before (found by a review of memory per connection), any value was kept until the connection's
 * next request named another: an idle keep-alive connection of a trusted proxy held the 12 KiB a
 * client had put there (14.7 KiB of heap each, against 3.9 KiB after a small request).
 */
export const MEMO_XFF_CHARS = 256

/** Characters of X-Forwarded-For a connection's socket holds for its next request (see MEMO_XFF_CHARS). */
export function forwardedForHeld(socket: Socket): number {
  return (socket as PeerSocket)[kPeer]?.lastXff?.length ?? 0
}

export interface AddressOptions {
  trustedProxies: readonly string[]
  ipv6PrefixBits: number
  /**
   * Told of a connection from a loopback or private address, not in trusted_proxies, whose first
   * request names a client in a proxy's header (see proxyHeaderOf): most likely a proxy that
   * should be listed, whose clients all count as it meanwhile.
   */
  onUntrustedProxy?: (peer: string, header: string) => void
}

/**
 * The address ranges a proxy in front of keygate sits in (same host, same network, a cluster's
 * pod network): a peer there sending a proxy's header is most likely a proxy. One on a public
 * address doing so is more likely a client passing its own hops along, so it is not told of.
 */
const UNTRUSTED_PROXY_RANGES = new Set(['loopback', 'private', 'uniqueLocal', 'linkLocal', 'carrierGradeNat'])

/** The header naming a client that a request carries, as proxies write them; undefined when none. */
function proxyHeaderOf(headers: Record<string, unknown>): string | undefined {
  if (headers['x-forwarded-for'] !== undefined) return 'X-Forwarded-For'
  if (headers['forwarded'] !== undefined) return 'Forwarded'
  if (headers['x-real-ip'] !== undefined) return 'X-Real-IP'
  return undefined
}

/**
 * How often, at most, a proxy not in trusted_proxies is warned of: an hour, as the setting is
 * mended once, and an operator who leaves a proxy out on purpose (one that passes its clients'
 * own X-Forwarded-For along) is reminded, not flooded.
 */
const PROXY_WARN_EVERY_MS = 3_600_000

/**
 * onUntrustedProxy for `serve`: a warning at most once an hour, naming the peer. Before, nothing
 * said so: with a local nginx or a balancer left out of trusted_proxies, every client was the
 * proxy's address, and a few bad keys from any of them locked out all (RATE_LIMIT_MAX_ATTEMPTS).
 */
export function untrustedProxyWarner(log: Logger, now: () => number): (peer: string, header: string) => void {
  const warnNow = oncePer(PROXY_WARN_EVERY_MS, now)
  return (peer, header) => {
    if (!warnNow()) return
    log.warn(
      `a request from ${peer} names a client in ${header}, but ${peer} is not in gateway.trusted_proxies: keygate takes it for the client, so the deny list, lockouts, rate limits and keys' allowed_cidrs see every client behind it as ${peer}; if it is a proxy in front of keygate, list it in gateway.trusted_proxies (KEYGATE_TRUSTED_PROXIES)`,
      { peer, header },
    )
  }
}

function inProxyRange(address: string): boolean {
  const parsed = parseAddress(address)
  return parsed !== undefined && UNTRUSTED_PROXY_RANGES.has(parsed.range())
}

/** A socket's address in the one spelling every stage and log line uses (IPv4-mapped IPv6 as IPv4). */
export function normalise(raw: string | undefined): string | undefined {
  if (raw === undefined) return undefined
  // The common case, a plain IPv4 address, needs no parsing.
  if (!raw.includes(':')) return raw
  return normalAddress(raw)
}

/** A port after an X-Forwarded-For entry's address. */
const PORT = /^:\d{1,5}$/

/**
 * The address of one X-Forwarded-For entry, or undefined when it names none. Some proxies (Azure
 * Application Gateway, IIS ARR) write the client's port too, as `192.0.2.7:4711` or
 * `[2001:db8::7]:443`: the port is dropped.
 */
function hopAddress(hop: string): string | undefined {
  const plain = normalAddress(hop)
  if (plain !== undefined) return plain
  if (hop.charCodeAt(0) === 91 /* [ */) {
    const end = hop.indexOf(']')
    if (end === -1 || (end + 1 < hop.length && !PORT.test(hop.slice(end + 1)))) return undefined
    return normalAddress(hop.slice(1, end))
  }
  const colon = hop.indexOf(':')
  return colon !== -1 && colon === hop.lastIndexOf(':') && PORT.test(hop.slice(colon)) ? normalAddress(hop.slice(0, colon)) : undefined
}

export function createClientAddressStage(options: AddressOptions): Stage {
  const keyOf = addressKeyer(options.ipv6PrefixBits)
  const trusted = options.trustedProxies.length > 0 ? rangeMatcher(options.trustedProxies) : undefined

  // The peer of a keep-alive connection does not change: worked out once per connection.
  const peerOf = (socket: PeerSocket): Peer | undefined => {
    let peer = socket[kPeer]
    if (peer === undefined) {
      const address = normalise(socket.remoteAddress)
      if (address === undefined) return undefined
      peer = { address, key: keyOf(address), trusted: trusted !== undefined && trusted(address), lastXff: undefined, lastClient: '', lastClientKey: '', proxyChecked: false }
      socket[kPeer] = peer
    }
    return peer
  }

  // Once per connection, on its first request: a proxy sends every request with the header.
  const told = options.onUntrustedProxy
  const checkProxy = told === undefined
    ? undefined
    : (peer: Peer, s: RequestState): void => {
        peer.proxyChecked = true
        const header = proxyHeaderOf(s.req.headers)
        if (header !== undefined && inProxyRange(peer.address)) told(peer.address, header)
      }

  if (trusted === undefined) {
    return (s: RequestState) => {
      const peer = peerOf(s.req.socket as PeerSocket)
      if (peer === undefined) return 'bad_request'
      if (!peer.proxyChecked && checkProxy !== undefined) checkProxy(peer, s)
      s.peer = peer.address
      s.address = peer.address
      s.addressKey = peer.key
      return undefined
    }
  }

  return (s: RequestState) => {
    const peer = peerOf(s.req.socket as PeerSocket)
    if (peer === undefined) return 'bad_request'
    if (!peer.proxyChecked && !peer.trusted && checkProxy !== undefined) checkProxy(peer, s)
    s.peer = peer.address
    s.peerTrusted = peer.trusted
    const xff = peer.trusted ? s.req.headers['x-forwarded-for'] : undefined
    const value = xff === undefined ? '' : typeof xff === 'string' ? xff : xff.join(',')
    if (value === peer.lastXff) {
      s.address = peer.lastClient
      s.addressKey = peer.lastClientKey
      return undefined
    }
    // No X-Forwarded-For, or an empty one (spaces and tabs alone): the client is the peer.
    if (withoutOws(value) === '') {
      s.address = peer.address
      s.addressKey = peer.key
      return undefined
    }
    // Walk from the right past trusted hops. Each entry was written by the trusted proxy to its
    // right, so one that names no address is refused: taking the peer's address instead would put
    // every client behind that proxy under one address (one deny-list entry, rate limit and lockout).
    let client = peer.address
    const hops = value.split(',')
    for (let i = hops.length - 1; i >= 0; i--) {
      const hop = hopAddress(withoutOws(hops[i] as string))
      if (hop === undefined) {
        // Logged as the proxy's request: no client address was found.
        s.address = peer.address
        s.addressKey = peer.key
        s.message = 'X-Forwarded-For from a trusted proxy names no client address.'
        return 'bad_request'
      }
      client = hop
      if (!trusted(hop)) break
    }
    s.address = client
    s.addressKey = client === peer.address ? peer.key : keyOf(client)
    if (value.length > MEMO_XFF_CHARS) return undefined
    peer.lastXff = value
    peer.lastClient = client
    peer.lastClientKey = s.addressKey
    return undefined
  }
}
