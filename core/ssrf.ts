// Webhook targets and SSRF. A target is refused unless every address it stands for is a public
// unicast address: loopback, private, link-local (cloud metadata at 169.254.169.254), carrier
// NAT, unique local, multicast, unspecified, reserved and the IPv6 forms that embed an IPv4
// address (IPv4-mapped, NAT64, 6to4, Teredo) are all refused, unless the address is in the
// explicit allow-list (`webhooks.allow_private`). Decimal, octal and hex IPv4 forms are
// normalised by the URL parser before the check. At delivery the name is resolved once, by the
// connection itself: the check runs inside the socket's DNS look-up, so the address checked is
// the address connected to (no second resolution an attacker's DNS could answer differently).
// Redirects are never followed.
//
// Look-ups are getaddrinfo (dns.lookup: /etc/hosts and nsswitch are honoured, as operators rely
// on, e.g. Kubernetes hostAliases), which blocks one of libuv's threadpool threads (4 by default)
// until the resolver answers and cannot be cancelled. Webhook look-ups go through WebhookNames:
// one look-up per name at a time, at most 2 in flight in the process, and no caller waits longer
// than its timeout. Before (found by a review), each connection called dns.lookup itself: one
// receiver whose DNS stopped answering had its 5 attempts' look-ups fill the threadpool for 10 s
// or more each, and every other look-up in the process (other receivers, the gateway's upstream,
// PostgreSQL's host) and the crypto and fs work on the pool queued behind them.
import { lookup as dnsLookup, type LookupAddress } from 'node:dns'
import ipaddr from 'ipaddr.js'
import type { Agent } from 'undici'
import { KeygateError } from './errors.ts'
import { rangeMatcher } from './keys/evaluate.ts'

export type AllowList = (address: string) => boolean

export function allowList(cidrs: readonly string[]): AllowList {
  return cidrs.length > 0 ? rangeMatcher(cidrs) : () => false
}

/**
 * What each of ipaddr.js's special ranges is, in words (before, found by a docs walk, its names
 * were the message: "is a rfc6052 address", "is a linkLocal address").
 */
export const RANGE_WORDS: Readonly<Record<string, string>> = {
  unspecified: 'an unspecified address (this host)',
  broadcast: 'the broadcast address',
  multicast: 'a multicast address',
  linkLocal: 'a link-local address',
  loopback: 'a loopback address',
  carrierGradeNat: 'a carrier-grade NAT address (RFC 6598)',
  private: 'a private address (RFC 1918)',
  reserved: 'a reserved or documentation address',
  as112: 'an AS112 address (RFC 7534)',
  as112v6: 'an AS112 address (RFC 7534)',
  amt: 'an AMT relay address (RFC 7450)',
  uniqueLocal: 'a unique local address (RFC 4193)',
  ipv4Mapped: 'an IPv4-mapped address',
  deprecatedSiteLocal: 'a site-local address (deprecated, RFC 3879)',
  discard: 'a discard-only address (RFC 6666)',
  rfc6145: 'an IPv4-translated address (RFC 6145)',
  rfc6052: 'a NAT64 address, which reaches the IPv4 address it embeds (RFC 6052)',
  '6to4': 'a 6to4 address (RFC 3056)',
  teredo: 'a Teredo address (RFC 4380)',
  benchmarking: 'a benchmarking address (RFC 5180)',
  deprecatedOrchid: 'an ORCHID address (deprecated, RFC 4843)',
  orchid2: 'an ORCHIDv2 address (RFC 7343)',
  droneRemoteIdProtocolEntityTags: 'a drone remote ID address (RFC 9374)',
  segmentRouting: 'a segment routing address (RFC 9602)',
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
  if (range !== 'unicast') return `${normal} is ${RANGE_WORDS[range] ?? `a special-purpose address (${range})`}`
  // ::/96 (IPv4-compatible, deprecated by RFC 4291; `[::127.0.0.1]` in a URL becomes ::7f00:1):
  // some stacks reach the embedded IPv4 address, and ipaddr.js files the range under unicast.
  if (a.kind() === 'ipv6' && (a as ipaddr.IPv6).parts.slice(0, 6).every((p) => p === 0)) return `${normal} is an IPv4-compatible IPv6 address`
  return undefined
}

/** The refusal of the url field for `why`: its message names the field, its `fields` entry does not, as validation_failed's. */
const refused = (why: string) => new KeygateError('webhook_url_refused', `url: ${why}`, { fields: [{ field: 'url', message: why }] })
/** The code of a delivery's connection refused for its address (see pinnedAgent). */
const ADDRESS_REFUSED = 'ERR_WEBHOOK_ADDRESS_REFUSED'

/**
 * Whether `err` refused a delivery for its address, as this process's `webhooks.allow_private`
 * has it (an IP literal, or what a name resolved to): another process sharing the store, whose
 * list differs, may send it.
 */
export function refusedForAddress(err: unknown): boolean {
  const e = err as { code?: unknown; cause?: { code?: unknown }; addressRefused?: unknown }
  return e.addressRefused === true || e.code === ADDRESS_REFUSED || e.cause?.code === ADDRESS_REFUSED
}

/** Parses and checks the form of a target URL; returns its host when it is a name, undefined for an IP literal (already checked). */
function checkUrl(url: string, allowed: AllowList): { parsed: URL; name: string | undefined } {
  let parsed: URL
  try {
    parsed = new URL(url)
  } catch {
    throw refused('is not a valid URL')
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw refused(`the scheme must be http or https, not ${parsed.protocol.slice(0, -1)}`)
  if (parsed.username || parsed.password) throw refused('must not carry credentials')
  // Port 0 reaches no server (before, found by a review: taken, and never deliverable).
  if (parsed.port === '0') throw refused('port 0 reaches no server')
  const host = parsed.hostname.startsWith('[') ? parsed.hostname.slice(1, -1) : parsed.hostname
  if (ipaddr.isValid(host)) {
    const why = addressRefusal(host, allowed)
    if (why) throw Object.assign(refused(`${why}; add it to webhooks.allow_private to allow an internal receiver`), { addressRefused: true })
    return { parsed, name: undefined }
  }
  return { parsed, name: host }
}

/** A getaddrinfo-style look-up of every address of a name (dns.lookup's shape). */
export type LookupFunction = (hostname: string, options: { all: true; verbatim: true }, callback: (err: NodeJS.ErrnoException | null, answers: LookupAddress[]) => void) => void

type Answer = (err: NodeJS.ErrnoException | null, answers: LookupAddress[]) => void

/** One name's look-up: queued for a slot, then running; its callers share the answer. */
interface Flight {
  readonly name: string
  readonly callers: Set<Answer>
  started: boolean
}

/** Webhook look-ups in flight in a process: well below libuv's threadpool (4 threads by default). */
export const LOOKUP_SLOTS = 2

/**
 * The name look-ups of webhook targets, bounded. Concurrent look-ups of one name are one call
 * (single-flight: a receiver's 5 attempts, and its retries while the first call still hangs, hold
 * one thread, not 5); at most `slots` calls run at once, the others queued in order; and a caller
 * gives up after its timeout, whether it was waiting for a slot or for the answer (ETIMEOUT), while
 * the call it leaves keeps its slot until getaddrinfo returns (the thread is busy until then). A
 * queued look-up that every caller gave up on is dropped without being made. The answers are not
 * cached: each caller gets the answer of a call made after it asked or while it waited.
 */
export class WebhookNames {
  readonly #lookup: LookupFunction
  readonly #slots: number
  readonly #flights = new Map<string, Flight>()
  readonly #queue: Flight[] = []
  #running = 0

  constructor(lookup: LookupFunction = (name, options, cb) => dnsLookup(name, options, cb), slots = LOOKUP_SLOTS) {
    this.#lookup = lookup
    this.#slots = slots
  }

  /** Every address of `name`, or an error: the look-up's own, or ETIMEOUT after `timeoutMs`. */
  lookup(name: string, timeoutMs: number, cb: Answer): void {
    let flight = this.#flights.get(name)
    if (flight === undefined) {
      flight = { name, callers: new Set(), started: false }
      this.#flights.set(name, flight)
      this.#queue.push(flight)
    }
    const f = flight
    const caller: Answer = (err, answers) => {
      clearTimeout(timer)
      cb(err, answers)
    }
    const timer = setTimeout(() => {
      f.callers.delete(caller)
      if (!f.started && f.callers.size === 0) {
        this.#flights.delete(name)
        this.#queue.splice(this.#queue.indexOf(f), 1)
      }
      const why = f.started ? 'without an answer' : `waiting for one of the ${this.#slots} webhook look-ups in flight (other receivers' names are slow to resolve)`
      cb(Object.assign(new Error(`the DNS look-up of ${name} reached its timeout (${timeoutMs} ms) ${why}`), { code: 'ETIMEOUT' }), [])
    }, timeoutMs)
    f.callers.add(caller)
    this.#next()
  }

  /** The same, as a promise. */
  resolve(name: string, timeoutMs: number): Promise<LookupAddress[]> {
    return new Promise((resolve, reject) => this.lookup(name, timeoutMs, (err, answers) => (err ? reject(err) : resolve(answers))))
  }

  #next(): void {
    while (this.#running < this.#slots) {
      const f = this.#queue.shift()
      if (f === undefined) return
      f.started = true
      this.#running++
      let answered = false
      const done: Answer = (err, answers) => {
        if (answered) return
        answered = true
        this.#running--
        if (this.#flights.get(f.name) === f) this.#flights.delete(f.name)
        for (const c of f.callers) c(err, answers)
        this.#next()
      }
      try {
        this.#lookup(f.name, { all: true, verbatim: true }, done)
      } catch (err) {
        done(err as NodeJS.ErrnoException, [])
      }
    }
  }
}

/** The process's webhook look-ups (every WebhookService shares the slots). */
export const webhookNames = new WebhookNames()

/**
 * At registration: the URL's form, and every address its name resolves to now. The look-up is
 * bounded by `timeoutMs` (`webhooks.timeout_ms`): before, an admin create of a receiver whose DNS
 * hangs waited as long as getaddrinfo did, and held a threadpool thread meanwhile.
 */
export async function checkTarget(url: string, allowed: AllowList, names: WebhookNames, timeoutMs: number): Promise<URL> {
  const { parsed, name } = checkUrl(url, allowed)
  if (name === undefined) return parsed
  let answers: LookupAddress[]
  try {
    answers = await names.resolve(name, timeoutMs)
  } catch (err) {
    const e = err as NodeJS.ErrnoException
    throw refused(e.code === 'ETIMEOUT' ? e.message : `${name} does not resolve (${e.code ?? e.message})`)
  }
  for (const a of answers) {
    const why = addressRefusal(a.address, allowed)
    // `why` is a sentence of its own ("127.0.0.1 is a loopback address"); before (found by a docs
    // walk), it was run on into "localhost resolves to 127.0.0.1 is a loopback address".
    if (why) throw refused(`${name} resolves to a refused address (${why}); add it to webhooks.allow_private to allow an internal receiver`)
  }
  return parsed
}

/** At delivery, before connecting: the URL's form (an IP literal is checked here, a name in the look-up). */
export function checkDeliveryUrl(url: string, allowed: AllowList): void {
  checkUrl(url, allowed)
}

type LookupCallback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void

/**
 * An undici Agent whose connections resolve a name once (through `names`, each look-up bounded by
 * the attempt's timeout) and connect only to addresses that pass the check (every answer; it
 * tries them in turn); a refused answer fails the connection with the reason. undici is loaded
 * here, not with this module: a CLI command that only queues deliveries never loads it (about
 * 0.15 s of CPU, a tenth of an `api-key` command on the embedded store).
 */
export async function pinnedAgent(allowed: AllowList, timeoutMs: number, names: WebhookNames = webhookNames): Promise<Agent> {
  const { Agent } = await import('undici')
  const lookup = (hostname: string, options: { all?: boolean }, cb: LookupCallback): void => {
    names.lookup(hostname, timeoutMs, (err, answers) => {
      if (err) return cb(err, '')
      for (const a of answers) {
        const why = addressRefusal(a.address, allowed)
        if (why) {
          const e: NodeJS.ErrnoException = new Error(`webhook target ${hostname} resolves to a refused address (${why})`)
          e.code = ADDRESS_REFUSED
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
