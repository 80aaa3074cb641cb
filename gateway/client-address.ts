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
  /** The X-Forwarded-For last seen on this connection and the client it named (a proxy's keep-alive connection mostly repeats one). */
  lastXff: string | undefined
  lastClient: string
  lastClientKey: string
}

const kPeer = Symbol('keygate.peer')
type PeerSocket = Socket & { [kPeer]?: Peer }

export interface AddressOptions {
  trustedProxies: readonly string[]
  ipv6PrefixBits: number
}

function normalise(raw: string | undefined): string | undefined {
  if (raw === undefined) return undefined
  // The common case, a plain IPv4 address, needs no parsing.
  if (!raw.includes(':')) return raw
  return normalAddress(raw)
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
    if (xff === undefined) {
      s.address = peer.address
      s.addressKey = peer.key
      return undefined
    }
    const value = typeof xff === 'string' ? xff : xff.join(',')
    if (value === peer.lastXff) {
      s.address = peer.lastClient
      s.addressKey = peer.lastClientKey
      return undefined
    }
    // Walk from the right past trusted hops; a malformed entry ends the walk (what is left of
    // it was written by the untrusted side).
    let client = peer.address
    const hops = value.split(',')
    for (let i = hops.length - 1; i >= 0; i--) {
      const hop = normalAddress((hops[i] as string).trim())
      if (hop === undefined) break
      client = hop
      if (!trusted(hop)) break
    }
    s.address = client
    s.addressKey = client === peer.address ? peer.key : keyOf(client)
    peer.lastXff = value
    peer.lastClient = client
    peer.lastClientKey = s.addressKey
    return undefined
  }
}
