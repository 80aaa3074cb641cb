// String formats shared by the config schema and the API schemas, registered with TypeBox once,
// each with the words that tell a user what it allows.
import { FormatRegistry } from '@sinclair/typebox'
import ipaddr from 'ipaddr.js'
import { parseRange } from './keys/evaluate.ts'

/** The first instant of the year 10000 (UTC): the embedded store holds no time from it on. */
export const YEAR_10000_MS = Date.UTC(10000, 0, 1)

// RFC 3339 §5.6: seconds required, `T` and `Z` in either case (§5.6's note), any fraction.
const DATE_TIME = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:[Zz]|[+-](\d{2}):(\d{2}))$/

/**
 * An RFC 3339 date-time naming a day that exists (Date.parse turns 2027-02-31 into March 3rd),
 * from 1970 to 9999 (the embedded store reads years below 100 wrongly, and no key dates from
 * before 1970), and no leap second (see leapSecondProblem). Before (found by a review), seconds
 * were optional and `t`/`z` refused: `12:00Z` was taken and `12:00:00z` refused, the other way
 * round from the `date-time` the OpenAPI document publishes.
 */
export function isDateTime(v: string): boolean {
  const m = DATE_TIME.exec(v)
  if (!m) return false
  const [year, month, day, hour, minute, second] = [m[1], m[2], m[3], m[4], m[5], m[6]].map(Number) as [number, number, number, number, number, number]
  if (year < 1970 || month < 1 || month > 12 || hour > 23 || minute > 59 || second > 59) return false
  if (m[7] !== undefined && (Number(m[7]) > 23 || Number(m[8]) > 59)) return false
  // 9999-12-31T23:59:00-23:59 is a year-10000 instant in UTC, which the embedded store cannot hold;
  // 1970-01-01T00:30:00+01:00 is one of 1969, which a list cursor cannot hold (before, found by a
  // review: an import took it, and listing keys stopped at that key with "not a cursor this
  // server returned").
  const at = Date.parse(v)
  return day >= 1 && day <= new Date(Date.UTC(year, month, 0)).getUTCDate() && at >= 0 && at < YEAR_10000_MS
}

/**
 * Why a date-time that RFC 3339 allows is refused all the same: a leap second (`23:59:60Z`),
 * which a JavaScript Date, and so keygate, cannot hold (Date.parse reads it as no time at all).
 * Said as such, rather than that the value is no RFC 3339 date-time, which it is.
 */
function leapSecondProblem(v: string): string | undefined {
  const m = DATE_TIME.exec(v)
  if (m?.[6] !== '60' || !isDateTime(`${v.slice(0, 17)}59${v.slice(19)}`)) return undefined
  return 'is a leap second (:60), which keygate cannot hold (a JavaScript date has no 60th second); use :59 or the next minute'
}

/** How an address is written, for the cidr and ip formats (see parseIp in core/keys/evaluate.ts). */
const ADDRESS_DETAIL =
  'IPv4 in four decimal parts (not `10.1`, `2130706433` or `010.0.0.1`, which other readers take for other addresses); IPv6, with an IPv4 tail in four decimal parts too, and a zone id (`%eth0`) ignored; an IPv4-mapped IPv6 address (`::ffff:192.0.2.7`) is read as its IPv4 address.'

/** An address or range as keygate reads one everywhere (four-part decimal IPv4, IPv6; see parseRange). */
export function isCidrOrAddress(value: string): boolean {
  // A zone id names an interface (`fe80::1%eth0`): letters, digits and `_.~-`, as RFC 6874 writes
  // one. Anything else was read as part of it, so `fe80::1%x,127.0.0.1/32` was one valid range,
  // fe80::1/32, where it reads as two (found by a review).
  const zone = /%([^/]*)/.exec(value)
  if (zone !== null && !/^[A-Za-z0-9_.~-]+$/.test(zone[1] as string)) return false
  return parseRange(value) !== undefined
}

/**
 * The network a range written with host bits set covers (`10.1.2.3/8` covers `10.0.0.0/8`), in
 * its normal form; undefined for a range written as its network, an address alone, or no range.
 */
export function coveredNetwork(value: string): string | undefined {
  const range = parseRange(value.trim())
  if (!range) return undefined
  const [addr, bits] = range
  if (bits === (addr.kind() === 'ipv4' ? 32 : 128)) return undefined
  const network = addr.kind() === 'ipv4' ? ipaddr.IPv4.networkAddressFromCIDR(`${addr.toString()}/${bits}`) : ipaddr.IPv6.networkAddressFromCIDR(`${addr.toString()}/${bits}`)
  return network.toString() === addr.toString() ? undefined : `${network.toString()}/${bits}`
}

/**
 * Why a range is refused when written with host bits set, wherever keygate reads one (the deny
 * list, a key's allowed_cidrs, trusted_proxies, webhooks.allow_private): it would cover the whole
 * network, where the admin may have meant one address, denying, letting in or trusting more than
 * written (before, found by a review, `10.1.2.3/8` was taken as 10.0.0.0/8 without a word).
 */
export function hostBitsProblem(value: string): string | undefined {
  const network = coveredNetwork(value)
  if (network === undefined) return undefined
  const address = value.trim().slice(0, value.trim().indexOf('/'))
  return `has host bits set: as a range it covers the whole network ${network}; write ${network} for that network, or ${address} alone for the one address`
}

/**
 * What the lockout routes and commands take: one address, or an IPv6 network as `GET /v1/lockouts`
 * lists one (`2001:db8:1:2::/64`: IPv6 clients are counted per network). Whether the network is
 * the size the lockouts count by is the server's to say (lockoutAddress in admin/schemas.ts).
 */
export function isLockoutAddress(value: string): boolean {
  if (!value.includes('/')) return isCidrOrAddress(value)
  return !value.includes('%') && isCidrOrAddress(value) && parseRange(value)?.[0].kind() === 'ipv6'
}

/**
 * A listen address, `host:port`: the host an IPv4 address, an IPv6 one in brackets or a host name
 * (LABEL, as HOST_PORT reads them). Before (found by a docs walk), any text without a colon or a
 * bracket was a host: `*:8080`, `300.1.1.1:8080` or one with a space passed `config check`, and
 * serve failed with "getaddrinfo ENOTFOUND *", naming no setting. Digits and dots alone are an
 * IPv4 address or nothing (the resolver reads `2130706433` as 127.0.0.1).
 */
export function parseListen(value: string): { host: string; port: number } | undefined {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(value)
  if (!m) return undefined
  const port = Number(m[3])
  if (port > 65535) return undefined
  const host = m[1] ?? m[2] ?? ''
  if (m[1] !== undefined) return ipaddr.IPv6.isValid(host) ? { host, port } : undefined
  if (/^[0-9.]+$/.test(host) ? !ipaddr.IPv4.isValidFourPartDecimal(host) : !HOST_NAME.test(host)) return undefined
  return { host, port }
}

/**
 * A Redis URL ioredis can use: its database, in the path or a `db` query item, digits, at most
 * 2147483647 (Redis's SELECT takes no more). Before (found by a docs walk), `redis://cache/abc` or
 * `?db=abc` passed, and serve ended on its first command with ioredis's stack trace (SELECT NaN);
 * `/5abc` was database 5 without a word; and (found by a config fuzzing review) a larger number
 * was refused by Redis alone, serve starting without it, a warning saying so.
 */
function isRedisUrl(value: string): boolean {
  const url = /^rediss?:\/\//.test(value) ? URL.parse(value) : null
  if (url === null) return false
  const path = url.pathname === '/' ? '' : url.pathname.slice(1)
  return (path === '' || isRedisDb(path)) && url.searchParams.getAll('db').every(isRedisDb)
}

const isRedisDb = (db: string): boolean => /^\d{1,10}$/.test(db) && Number(db) <= 2_147_483_647

/**
 * Whether two listen addresses cannot both be bound: one port (not 0, which picks a free one each
 * time) on the same host, or on `::` (every address, IPv4 too) and any host, or on `0.0.0.0` and
 * any host but an IPv6 address (Linux binds 0.0.0.0 and ::1 on one port side by side). A name
 * is compared as written: what it resolves to is not known here.
 */
export function listenOverlaps(a: string, b: string): boolean {
  const [x, y] = [parseListen(a), parseListen(b)]
  if (!x || !y || x.port === 0 || x.port !== y.port) return false
  // IPv6 in its one spelling (`::0` is `::`), an IPv4-mapped one as the IPv4 address it is.
  const canonical = (host: string) => (ipaddr.isValid(host) ? ipaddr.process(host).toString() : host.toLowerCase())
  const [p, q] = [canonical(x.host), canonical(y.host)]
  const v6 = (host: string) => ipaddr.IPv6.isValid(host)
  return p === q || p === '::' || q === '::' || (p === '0.0.0.0' && !v6(q)) || (q === '0.0.0.0' && !v6(p))
}

// A DNS label as Host values carry them: letters, digits, `-` inside, and `_` (service names).
const LABEL = '[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?'
// A host name: labels, one trailing dot allowed.
const NAME = `(?:${LABEL}\\.)*${LABEL}\\.?`
const HOST_NAME = new RegExp(`^${NAME}$`)
const HOST_PORT = new RegExp(`^(?:\\[([0-9A-Fa-f:.]+)\\]|(${NAME}))(?::([1-9][0-9]{0,4}))?$`)

/**
 * A Host a request can carry, as a route names it: a name (one trailing dot allowed) or IPv4
 * address, or a bracketed IPv6 address, then an optional port from 1 to 65535. A wildcard, a
 * scheme, a path or a bare IPv6 address passed, and never matched (found by a review).
 */
function isHostAndPort(value: string): boolean {
  const m = HOST_PORT.exec(value)
  if (!m) return false
  if (m[1] !== undefined && !ipaddr.IPv6.isValid(m[1])) return false
  return (m[2] === undefined || m[2].length <= 254) && (m[3] === undefined || Number(m[3]) <= 65535)
}

/**
 * An http(s) URL with a host and no user:password@: a credential there would be shown wherever
 * the URL is (messages, logs), and each such setting has its own credential settings.
 */
function isHttpUrl(value: string): boolean {
  try {
    const u = new URL(value)
    return (u.protocol === 'http:' || u.protocol === 'https:') && u.hostname !== '' && u.username === '' && u.password === ''
  } catch {
    return false
  }
}

/**
 * Header names an API key header cannot take: HTTP's own (framing, routing, hop-by-hop, the
 * other credential and cookies) and those the gateway sets or reads for something else.
 */
const RESERVED_HEADERS = new Set([
  'authorization', 'proxy-authorization', 'host', 'cookie', 'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding',
  'upgrade', 'expect', 'content-length', 'content-type', 'content-encoding', 'forwarded', 'x-real-ip', 'x-request-id', 'http2-settings',
])

/** A header name a key may be sent in (gateway.api_key_header): a token, and none HTTP or keygate uses otherwise. */
function isApiKeyHeader(value: string): boolean {
  const name = value.toLowerCase()
  return /^[a-z0-9][a-z0-9-]{0,63}$/.test(name) && !RESERVED_HEADERS.has(name) && !name.startsWith('x-keygate-') && !name.startsWith('x-forwarded-')
}

/**
 * Each format's check and the words for what it allows (in messages, config docs and
 * /openapi.json); where those words are not all a reader needs, `detail` (the document only) and
 * `why` (why a value that matches the words is refused all the same).
 */
/** A UUID of any version, as the replaced system's keys were written (a legacy key pasted where its hash belongs). */
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

const FORMATS: Record<string, [check: (v: string) => boolean, words: string, more?: { detail?: string; why?: (v: string) => string | undefined }]> = {
  // A range as its network, so what is denied, let in or trusted is what is written.
  cidr: [
    (v) => isCidrOrAddress(v) && coveredNetwork(v) === undefined,
    'an IPv4 or IPv6 address, or a CIDR range written as its network address, such as 10.0.0.0/8 or 2001:db8::/32',
    { detail: `${ADDRESS_DETAIL} A range is NETWORK/BITS, 0 to 32 bits for IPv4 and 0 to 128 for IPv6, without leading zeros, and without host bits (\`10.1.2.3/8\` is refused, naming 10.0.0.0/8); an address alone is one address (/32, /128).`, why: hostBitsProblem },
  ],
  ip: [(v) => !v.includes('/') && isCidrOrAddress(v), 'an IPv4 or IPv6 address such as 192.0.2.7 or 2001:db8::7', { detail: `${ADDRESS_DETAIL} No range (/BITS).` }],
  'lockout-address': [isLockoutAddress, 'an IPv4 or IPv6 address such as 192.0.2.7 or 2001:db8::7, or an IPv6 network as the lockouts list it, such as 2001:db8:1:2::/64', { detail: `${ADDRESS_DETAIL} IPv6 clients are locked out per network (\`rate_limits.ipv6_prefix_bits\`): any address in it, or the network itself, names its lockout; a network of another size is refused, as it names none.` }],
  listen: [(v) => parseListen(v) !== undefined, 'host:port, such as 0.0.0.0:8080 or [::1]:8080'],
  'api-key-header': [isApiKeyHeader, "a header name of letters, digits and -, such as X-API-Key or apikey, and none HTTP or keygate uses for something else (Authorization, Host, Cookie, Content-*, hop-by-hop ones, X-Forwarded-*, X-Keygate-*, X-Request-Id)"],
  'http-url': [isHttpUrl, 'an http:// or https:// URL without user:password@'],
  // A URL paths are added to (the CLI's admin URL, an upstream): a query or fragment would stand in
  // front of them. An upstream's were dropped, so `?tenant=acme` never reached it (found by a review).
  'base-url': [(v) => isHttpUrl(v) && !/[?#]/.test(v), 'an http:// or https:// URL without user:password@, a query or a fragment'],
  'host-port': [isHostAndPort, 'a host name or IP address with an optional :port, such as api.example.com, api.example.com:8443, 192.0.2.7 or [2001:db8::7]:8443 (no scheme, path or wildcard)'],
  'postgres-url': [(v) => /^postgres(ql)?:\/\//.test(v) && URL.canParse(v), 'a postgres:// or postgresql:// URL'],
  'redis-url': [isRedisUrl, 'a redis:// or rediss:// URL, its database, if any, a number up to 2147483647 (redis://host:6379/5)'],
  // Non-ASCII characters are matched as clients send them, UTF-8 percent-encoded (config/routes.ts), which a lone surrogate has no form of.
  // No control character (C0, DEL): Node answers 400 to a request target holding one, so such a
  // route never matched (found by a review); a client sends `%01`, which a route may name.
  'path-prefix': [(v) => /^\/[^\s?#\x00-\x1f\x7f]*$/.test(v) && !/(^|\/)\.\.?(\/|$)/.test(v) && v.isWellFormed(), 'a path starting with / without ?, #, control characters or dot segments'],
  // A legacy key's hash in an import row. The usual mistake is the legacy key itself (a UUID),
  // told as such: before, it was "expected a string matching ^[0-9a-f]{64}$", which said neither
  // that nor that upper case is taken (found by a migration walk).
  'sha256-hex': [
    (v) => /^[0-9a-fA-F]{64}$/.test(v),
    'a SHA-256 in hex: 64 hexadecimal digits, in either case, as `printf %s KEY | sha256sum` prints it',
    { why: (v) => (UUID.test(v.trim()) ? 'is shaped like a legacy key (a UUID), not its hash: give the SHA-256 in hex of the key in lower case (printf %s KEY | sha256sum)' : undefined) },
  ],
  'base64-32': [(v) => /^[A-Za-z0-9+/]{43}=$/.test(v) && Buffer.from(v, 'base64').length === 32, '32 bytes in base64 (as `openssl rand -base64 32` prints), without its line break'],
  // A bearer credential as a client sends it: a space or a line break (a secret made from a file
  // that `echo` wrote) could never be presented, and set, it stops the first admin key from being
  // made: every admin call was 401 with nothing to say why (found by a review).
  'admin-token': [(v) => /^[!-~]{16,}$/.test(v), 'at least 16 visible ASCII characters, without spaces or line breaks (a file written by echo ends in one)'],
  // A Redis pub/sub channel as operators write one: a typo'd space or a pasted line break would
  // publish where no subscriber listens.
  // Also in SCAN patterns (core/lockout.ts): nothing a glob reads.
  'redis-prefix': [(v) => /^[A-Za-z0-9_.:-]{0,100}$/.test(v), 'letters, digits and _ . : -, at most 100, such as staging: (or empty)'],
  'redis-channel': [(v) => /^[!-~]{1,200}$/.test(v), 'visible ASCII characters without spaces, at most 200, such as keygate:anomaly:alerts'],
  // With a key scope's pattern (RouteScope): on a key `orders:*` grants every `orders:` scope; a route
  // needing it passed only keys holding that very wildcard, not one with `orders:read`.
  'route-scope': [(v) => !v.endsWith(':*'), "scope names as keys hold them, such as admin or orders:read (a lowercase letter or digit, then up to 63 of a-z 0-9 : . _ * -), and no wildcard such as orders:* (a key's orders:* grants every orders: scope; a route names the one it needs)"],
  'key-prefix': [(v) => /^[a-z][a-z0-9]{0,15}_$/.test(v), 'lowercase letters and digits ending in _, such as kg_'],
  'date-time': [
    isDateTime,
    'an RFC 3339 date-time with seconds, in the years 1970 to 9999 as UTC, such as 2027-01-31T12:00:00Z',
    { detail: '`T` and `Z` in either case; any fraction of a second, read to the millisecond. A leap second (`:60`) is refused: a JavaScript date cannot hold it.', why: leapSecondProblem },
  ],
}

export const FORMAT_WORDS: Record<string, string> = {}
/** Why a value a format refuses is refused, where the format says more than its words (FORMATS). */
export const FORMAT_WHY: Record<string, (v: string) => string | undefined> = {}
const FORMAT_DETAIL: Record<string, string> = {}
for (const [name, [check, words, more]] of Object.entries(FORMATS)) {
  FormatRegistry.Set(name, check)
  FORMAT_WORDS[name] = words
  if (more?.why) FORMAT_WHY[name] = more.why
  if (more?.detail) FORMAT_DETAIL[name] = more.detail
}

/** What a format allows, as a document describes it: its words as a sentence, and any detail. */
export function formatDescription(format: string): string | undefined {
  const words = FORMAT_WORDS[format]
  if (words === undefined) return undefined
  const detail = FORMAT_DETAIL[format]
  return `${words.charAt(0).toUpperCase()}${words.slice(1)}.${detail ? ` ${detail}` : ''}`
}
