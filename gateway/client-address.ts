// The client address (SPEC §3): the socket peer, or — when the peer is a trusted proxy — the
// right-most address in X-Forwarded-For that is not itself a trusted proxy. Addresses are
// normalised (IPv4-mapped IPv6 becomes IPv4); IPv6 clients are counted per network
// (`rate_limits.ipv6_prefix_bits`) for limits and lockouts, since one host holds a whole /64.
import type { Socket } from 'node:net'
import { normalAddress, rangeMatcher } from '../core/keys/evaluate.ts'
import { addressKeyer } from '../core/lockout.ts'
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
      peer = { address, key: keyOf(address), trusted: trusted !== undefined && trusted(address), lastXff: undefined, lastClient: '', lastClientKey: '' }
      socket[kPeer] = peer
    }
    return peer
  }

  if (trusted === undefined) {
    return (s: RequestState) => {
      const peer = peerOf(s.req.socket as PeerSocket)
      if (peer === undefined) return 'bad_request'
      s.peer = peer.address
      s.address = peer.address
      s.addressKey = peer.key
      return undefined
    }
  }

  return (s: RequestState) => {
    const peer = peerOf(s.req.socket as PeerSocket)
    if (peer === undefined) return 'bad_request'
    s.peer = peer.address
    s.peerTrusted = peer.trusted
    const xff = peer.trusted ? s.req.headers['x-forwarded-for'] : undefined
    const value = xff === undefined ? '' : typeof xff === 'string' ? xff : xff.join(',')
    if (value === peer.lastXff) {
      s.address = peer.lastClient
      s.addressKey = peer.lastClientKey
      return undefined
    }
    // No X-Forwarded-For, or an empty one: the client is the peer.
    if (value.trim() === '') {
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
      const hop = hopAddress((hops[i] as string).trim())
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
