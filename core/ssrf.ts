// Webhook targets and SSRF. A target is refused unless every address it stands for is a public
// unicast address: loopback, private, link-local (cloud metadata at 169.254.169.254), carrier
// NAT, unique local, multicast, unspecified, reserved and the IPv6 forms that embed an IPv4
// address (IPv4-mapped, NAT64, 6to4, Teredo) are all refused, unless the address is in the
// explicit allow-list (`webhooks.allow_private`). Decimal, octal and hex IPv4 forms are
// normalised by the URL parser before the check. At delivery the name is resolved once, by the
// connection itself: the check runs inside the socket's DNS look-up, so the address checked is
// the address connected to (no second resolution an attacker's DNS could answer differently).
// Redirects are never followed.
import { lookup as dnsLookup, type LookupAddress } from 'node:dns'
import ipaddr from 'ipaddr.js'
import { Agent } from 'undici'
import { KeygateError } from './errors.ts'
import { rangeMatcher } from './keys/evaluate.ts'

export type AllowList = (address: string) => boolean

export function allowList(cidrs: readonly string[]): AllowList {
  return cidrs.length > 0 ? rangeMatcher(cidrs) : () => false
}

/** Why `address` may not be reached, or undefined when it may. */
export function addressRefusal(address: string, allowed: AllowList): string | undefined {
  let a: ipaddr.IPv4 | ipaddr.IPv6
  try {
    a = ipaddr.parse(address)
  } catch {
    return `${address} is not an IP address`
  }
  if (a.kind() === 'ipv6' && (a as ipaddr.IPv6).isIPv4MappedAddress()) a = (a as ipaddr.IPv6).toIPv4Address()
  const normal = a.toString()
  if (allowed(normal)) return undefined
  const range = a.range()
  if (range !== 'unicast') return `${normal} is a ${range} address`
  // ::/96 (IPv4-compatible, deprecated by RFC 4291; `[::127.0.0.1]` in a URL becomes ::7f00:1):
  // some stacks reach the embedded IPv4 address, and ipaddr.js files the range under unicast.
  if (a.kind() === 'ipv6' && (a as ipaddr.IPv6).parts.slice(0, 6).every((p) => p === 0)) return `${normal} is an IPv4-compatible IPv6 address`
  return undefined
}

const refused = (message: string) => new KeygateError('webhook_url_refused', message, { fields: [{ field: 'url', message }] })

/** Parses and checks the form of a target URL; returns its host when it is a name, undefined for an IP literal (already checked). */
function checkUrl(url: string, allowed: AllowList): { parsed: URL; name: string | undefined } {
  let parsed: URL
  try {
    parsed = new URL(url)
  } catch {
    throw refused('url: is not a valid URL')
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw refused(`url: the scheme must be http or https, not ${parsed.protocol.slice(0, -1)}`)
  if (parsed.username || parsed.password) throw refused('url: must not carry credentials')
  // Port 0 reaches no server (before, found by a review: taken, and never deliverable).
  if (parsed.port === '0') throw refused('url: port 0 reaches no server')
  const host = parsed.hostname.startsWith('[') ? parsed.hostname.slice(1, -1) : parsed.hostname
  if (ipaddr.isValid(host)) {
    const why = addressRefusal(host, allowed)
    if (why) throw refused(`url: ${why}; add it to webhooks.allow_private to allow an internal receiver`)
    return { parsed, name: undefined }
  }
  return { parsed, name: host }
}

/** At registration: the URL's form, and every address its name resolves to now. */
export async function checkTarget(url: string, allowed: AllowList): Promise<URL> {
  const { parsed, name } = checkUrl(url, allowed)
  if (name === undefined) return parsed
  let answers: LookupAddress[]
  try {
    answers = await new Promise((resolve, reject) => dnsLookup(name, { all: true, verbatim: true }, (err, list) => (err ? reject(err) : resolve(list))))
  } catch (err) {
    throw refused(`url: ${name} does not resolve (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`)
  }
  for (const a of answers) {
    const why = addressRefusal(a.address, allowed)
    if (why) throw refused(`url: ${name} resolves to ${why}; add it to webhooks.allow_private to allow an internal receiver`)
  }
  return parsed
}

/** At delivery, before connecting: the URL's form (an IP literal is checked here, a name in the look-up). */
export function checkDeliveryUrl(url: string, allowed: AllowList): void {
  checkUrl(url, allowed)
}

type LookupCallback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void

/**
 * An undici Agent whose connections resolve a name once and connect only to addresses that
 * pass the check (every answer; it tries them in turn); a refused answer fails the connection
 * with the reason.
 */
export function pinnedAgent(allowed: AllowList, timeoutMs: number): Agent {
  const lookup = (hostname: string, options: { all?: boolean }, cb: LookupCallback): void => {
    dnsLookup(hostname, { all: true, verbatim: true }, (err, answers) => {
      if (err) return cb(err, '')
      for (const a of answers) {
        const why = addressRefusal(a.address, allowed)
        if (why) {
          const e: NodeJS.ErrnoException = new Error(`webhook target ${hostname} resolves to ${why}`)
          e.code = 'ERR_WEBHOOK_ADDRESS_REFUSED'
          return cb(e, '')
        }
      }
      const first = answers[0]
      if (!first) return cb(Object.assign(new Error(`${hostname} has no address`), { code: 'ENOTFOUND' }), '')
      // Every answer passed: the connection may try each in turn (Node's autoSelectFamily asks
      // for all), as any client would. Before, only the first was given: a receiver whose name
      // answers IPv6 first was never reached from a host without IPv6 (found by a review).
      if (options.all) cb(null, answers)
      else cb(null, first.address, first.family)
    })
  }
  return new Agent({ connect: { lookup: lookup as never, timeout: timeoutMs }, headersTimeout: timeoutMs, bodyTimeout: timeoutMs, keepAliveTimeout: 4000 })
}
