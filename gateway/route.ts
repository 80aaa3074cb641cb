// Routes: the longest matching path prefix wins (on a segment boundary: /api matches /api,
// /api/x and /api?q, not /apix); at equal length a route naming the Host and port wins over one
// naming the Host alone, which wins over one that names none. Then the scope check: a route
// with scopes needs a key holding any one of them; a key scope `orders:*` grants every scope
// starting with `orders:` (a route's scopes are no wildcards, and `*` is no scope: RouteScope).
//
// Routes are matched on the path as sent (a route's non-ASCII characters percent-encoded, as
// clients send them), and the path is forwarded as sent. Upstreams read some paths differently:
// they decode percent-escapes (`/api/%61dmin`, `/api/admin%2Fusers`, `/donn%c3%a9es` as UTF-8),
// drop `;` segment parameters (`/api/admin;x/users`, Tomcat and Spring), merge `//`, read `\`
// as `/`, ignore letter case, drop a segment's trailing dots (IIS) or a format suffix
// (`/api/admin.json`, Rails and older Spring). Where routes nest (one's prefix inside
// another's, or a `/` route), a path that such a reading puts under another route than the one
// it matched is refused (400 bad_request): otherwise a key with only the outer route's scope
// could reach the inner route's resources. Other paths with those characters are forwarded
// unchanged. Where routes name hosts, a Host that a URL parser reads as another route's host
// (percent-escapes, IPv4 in another form) is refused too (Router.hostAmbiguous).
import { canonicalHost, lenientReadingOf, prefixReadings, routeHost, routePrefix, upstreamBase, withoutFormatSuffix } from '../config/routes.ts'
import type { RouteConfig } from '../config/schema.ts'
import { decodeEscapes, hasBody, hostName } from '../core/http.ts'
import type { CachedKey } from './key-cache.ts'
import { isApiKeyHeader, type KeySources } from './key-extract.ts'
import { FORWARD_NOW, pathOf, type RequestState, type Stage } from './state.ts'

export interface CompiledRoute {
  readonly index: number
  readonly name: string
  readonly prefix: string
  /** `prefix` in lower case, and as a lenient upstream reads it (see lenientReading): a path read leniently is under the route when under either. */
  readonly prefixLower: string
  readonly prefixLenient: string
  /** prefixLenient with a format suffix dropped (`/api/v2.1` is `/api/v2`): a path read leniently is the route's when it is this path itself, and goes to the route's upstream. */
  readonly prefixSuffixless: string
  /**
   * Where requests reach their upstream as sent under a base path (`origin` and base path), for a
   * route that does not strip its prefix; undefined for one that does. A format suffix an upstream
   * drops leads from one route to another only where both have the same (the upstream sees both
   * routes' paths as the client sent them, under one base).
   */
  readonly upstreamBase: string | undefined
  /** Lowercase; compared with the port when it has one, else with the host name only. */
  readonly host: string | undefined
  readonly hostHasPort: boolean
  readonly origin: string
  /** Path of the upstream URL without its trailing slash ('' for none). */
  readonly basePath: string
  readonly timeoutMs: number
  /** keepalive_timeout_ms: how long an idle upstream connection is kept. */
  readonly keepaliveMs: number
  readonly scopes: readonly string[]
  readonly stripPrefix: boolean
  readonly preserveHost: boolean
  /** The X-Forwarded-Prefix this route adds: its prefix where it strips it, else undefined. */
  readonly forwardedPrefix: string | undefined
  /** rewrite_redirects: whether a Location naming the upstream's own URL is rewritten (publicLocation). */
  readonly rewriteRedirects: boolean
  /** cors_preflight: a CORS preflight without a credential is forwarded without a key (createPreflightStage). */
  readonly corsPreflight: boolean
}

/**
 * A route with scopes (`route`) whose upstream paths another route (`by`) reaches with fewer
 * (Router.exposures): `routePath` by the one and `byPath` by the other are both `upstreamPath` to
 * the upstream.
 */
export interface RouteExposure {
  route: string
  routePath: string
  by: string
  byPath: string
  upstreamPath: string
}

/** What a start logs, and `config check` prints, for an exposure. */
export function exposureWarning(e: RouteExposure): string {
  return `route "${e.route}" has scopes, but route "${e.by}" reaches its upstream paths without them: ${e.routePath} by "${e.route}" and ${e.byPath} by "${e.by}" are both ${e.upstreamPath} to the upstream; give "${e.by}" the same scopes, or another upstream or base path`
}

/**
 * What a start logs, and `config check` prints, when the upstream shortcut (`upstream`,
 * KEYGATE_UPSTREAM) adds its route for `/`, without scopes, beside routes that ask for scopes:
 * every path they do not cover is then open to any valid key. Said, not refused: a public `/`
 * beside scoped routes may be meant. Before (found by a deployment review), nothing said so, and a
 * manifest's advice (name scoped routes in a file) left the variable set beside them.
 */
export function shortcutWarning(config: { upstream?: string | undefined; routes: readonly RouteConfig[] }): string | undefined {
  if (config.upstream === undefined) return undefined
  const scoped = config.routes.filter((r) => r.scopes.length > 0).map((r) => JSON.stringify(r.name))
  if (scoped.length === 0) return undefined
  return `the upstream shortcut (upstream, KEYGATE_UPSTREAM) adds route "default" for / without scopes beside routes that ask for scopes (${scoped.join(', ')}): any valid key, admin keys included, reaches every path those routes do not cover; leave the shortcut out and name a route for / where that is not meant`
}

export class Router {
  readonly routes: readonly CompiledRoute[]
  readonly #ordered: readonly CompiledRoute[]
  /** Some route matches on the host: only then is Host lower-cased per request. */
  readonly #byHost: boolean

  constructor(routes: readonly RouteConfig[]) {
    this.routes = routes.map((r, index) => {
      const url = new URL(r.upstream)
      const host = routeHost(r.host)
      const prefix = routePrefix(r.path)
      const readings = prefixReadings(prefix)
      return {
        index,
        name: r.name,
        prefix,
        prefixLower: readings.lower,
        prefixLenient: readings.lenient,
        prefixSuffixless: readings.suffixless,
        upstreamBase: upstreamBase(r.upstream, r.strip_prefix, prefix),
        host,
        hostHasPort: host !== undefined && hostName(host) !== host,
        origin: url.origin,
        basePath: url.pathname === '/' ? '' : url.pathname.replace(/\/$/, ''),
        timeoutMs: r.timeout_ms,
        keepaliveMs: r.keepalive_timeout_ms,
        scopes: r.scopes,
        stripPrefix: r.strip_prefix,
        preserveHost: r.preserve_host,
        forwardedPrefix: r.strip_prefix && prefix !== '/' ? prefix : undefined,
        rewriteRedirects: r.rewrite_redirects,
        corsPreflight: r.cors_preflight,
      }
    })
    this.#byHost = this.routes.some((r) => r.host !== undefined)
    // At equal length the more specific first: a Host with its port, then a Host (before, file
    // order: a route for example.com took example.com:8443 from that port's own, found by a review).
    this.#ordered = [...this.routes].sort((a, b) => b.prefix.length - a.prefix.length || hostSpecificity(b) - hostSpecificity(a))
    const readings = (r: CompiledRoute) => [r.prefixLower, r.prefixLenient, r.prefixSuffixless]
    const inside = (b: CompiledRoute, a: CompiledRoute) => readings(b).some((bp) => readings(a).some((ap) => bp === ap || bp.startsWith(ap + '/')))
    this.#nested = this.routes.some((a) => this.routes.some((b) => a !== b && (a.prefix === '/' || inside(b, a))))
    this.#plainPrefixes = this.routes.every((r) => readings(r).every((p) => p === r.prefix))
  }

  /** Some route's prefix lies inside another's: only then can a lenient reading of a path change its route. */
  readonly #nested: boolean
  /**
   * Every route's prefix is as lenient upstreams read it (lower case, no escapes, no dots): only
   * then is a path without the characters such a reading changes its own reading, and under the
   * route it matched as read so too. A route of `/Admin` is `/admin` to IIS: `/admin/x` went by `/`
   * to the upstream that served it as `/Admin/x` (found by a read-back).
   */
  readonly #plainPrefixes: boolean

  /** The route of `target`. */
  match(host: string | undefined, target: string): CompiledRoute | undefined {
    const lower = this.#byHost && host !== undefined ? canonicalHost(host) : undefined
    for (const r of this.#ordered) {
      if (!under(target, r.prefix) || !this.#hostMatches(r, lower)) continue
      return r
    }
    return undefined
  }

  #hostMatches(r: CompiledRoute, lower: string | undefined): boolean {
    return r.host === undefined || (lower !== undefined && (r.hostHasPort ? lower : hostName(lower)) === r.host)
  }

  /**
   * The route whose upstream a lenient upstream serves `reading` (a lenient reading of a path
   * sent on route `sentTo`) from: the one of the longest prefix that holds it, its prefix read in
   * lower case or leniently, or read without its format suffix and on `sentTo`'s upstream, this
   * path itself (`/openapi` is `/openapi.json` to a server that drops format suffixes; see
   * upstreamBase). By the
   * length of the reading, not of the prefix as configured (found by a review: a prefix of
   * escapes, longer as written, hid a more specific route). `sameUpstream`: only routes to
   * `sentTo`'s upstream (the reading dropped a format suffix, which only that server does).
   */
  #leniently(host: string | undefined, reading: string, sentTo: CompiledRoute, sameUpstream: boolean): CompiledRoute | undefined {
    const lower = this.#byHost && host !== undefined ? canonicalHost(host) : undefined
    let found: CompiledRoute | undefined
    let best = -1
    for (const r of this.#ordered) {
      const here = r.upstreamBase !== undefined && r.upstreamBase === sentTo.upstreamBase
      if (sameUpstream && !here) continue
      const length = Math.max(
        under(reading, r.prefixLower) ? r.prefixLower.length : -1,
        under(reading, r.prefixLenient) ? r.prefixLenient.length : -1,
        here && exactly(reading, r.prefixSuffixless) ? r.prefixSuffixless.length : -1,
      )
      if (length === -1 || !this.#hostMatches(r, lower)) continue
      // At equal length the more specific host (a Host with its port, then a Host), as the strict
      // order has it (before, found by a review: the strict order's tie, by the prefix as
      // written, let a longer-written route for any host take a host's own route's reading).
      const rank = length * 3 + hostSpecificity(r)
      if (rank <= best) continue
      found = r
      best = rank
    }
    return found
  }

  /**
   * Whether `target`, matched to `r`, falls under another route as a lenient upstream reads its
   * path (see the top of this file). `pathBytes`: the path's escapes decoded, when the request
   * check decoded them already (RequestState.pathBytes), so that they are decoded once.
   */
  ambiguous(host: string | undefined, target: string, r: CompiledRoute, pathBytes?: string): boolean {
    if (!this.#nested) return false
    const path = pathOf(target)
    if (this.#plainPrefixes && !LENIENT_CHANGES.test(path)) return false
    const bytes = pathBytes ?? decodeEscapes(path)
    if (this.#elsewhere(host, lenientReadingOf(bytes, false), r)) return true
    // A path that begins with `//` (or `/\`) is a host and a path to a URL parser: `//evil/api/admin`
    // is /api/admin to `new URL(req.url, base)` (once the example of Node's own documentation),
    // Python's urlsplit and PHP's parse_url. Before (found by a review), only its merged reading
    // (/evil/api/admin) was judged, and it went by `/` to such an upstream, past /api/admin's scope.
    const afterAuthority = pathAfterAuthority(bytes)
    return afterAuthority !== undefined && this.#elsewhere(host, lenientReadingOf(afterAuthority, false), r)
  }

  /**
   * Whether the request's `host`, `target` matched to `r`, is another route's host as a URL parser
   * following the WHATWG URL standard reads it (urlHost): Node's, Deno's and Bun's `new URL`, which
   * tRPC's Node adapter and Node's own documentation read a request's host with, decode
   * percent-escapes and map what they decode to (`%61dmin.example` and `%EF%BD%81dmin.example` are
   * `admin.example`), read IPv4 in any of its forms (`10.5`, `0x0a.0.0.5`) and a port by its
   * number (`:08443`). Before (found by a review), such a Host went by a route for any host,
   * without the host's route's scopes, and reached the upstream as Host (preserve_host) and
   * X-Forwarded-Host. Only where some route names a host; a plain Host is read alike by both.
   */
  hostAmbiguous(host: string | undefined, target: string, r: CompiledRoute): boolean {
    if (!this.#byHost || host === undefined || plainHost(host)) return false
    const read = urlHost(host)
    return read !== undefined && this.match(read, target) !== r
  }

  /**
   * Whether a trusted proxy's X-Forwarded-Host (`value`), which the upstream gets as it came,
   * names in any of its members another route for `target` than `r`, the route of the request's
   * Host: plainly or as a URL parser reads it (hostAmbiguous). An upstream behind a proxy reads the
   * host from it (Express's req.hostname under `trust proxy` takes its first member, Werkzeug's
   * ProxyFix its last). Before (found by a review), an nginx in front that sends its own upstream
   * name as Host (proxy_pass's default) and the client's in X-Forwarded-Host, or one that passes
   * a client's X-Forwarded-Host on, had a scoped host's requests go by a route for any host, to an
   * upstream that served them as that host's. Only where some route names a host.
   */
  forwardedHostAmbiguous(value: string | string[] | undefined, target: string, r: CompiledRoute): boolean {
    if (!this.#byHost || typeof value !== 'string') return false
    for (const member of value.split(',')) {
      const host = member.trim()
      if (host !== '' && (this.match(host, target) !== r || this.hostAmbiguous(host, target, r))) return true
    }
    return false
  }

  /** Whether `reading`, a lenient reading of a path matched to `r`, is another route's (ambiguous). */
  #elsewhere(host: string | undefined, reading: string, r: CompiledRoute): boolean {
    const other = (route: CompiledRoute | undefined) => route !== undefined && (route.prefixLower !== r.prefixLower || route.host !== r.host)
    if (other(this.#leniently(host, reading, r, false))) return true
    // A format suffix is dropped by the upstream the request goes to, and leads nowhere else
    // (before, found by a review: /app.js was refused beside routes / and /app to other upstreams).
    const suffixless = withoutFormatSuffix(reading)
    return suffixless !== reading && other(this.#leniently(host, suffixless, r, true))
  }

  /**
   * Routes with scopes whose upstream paths another route reaches with fewer scopes: a request
   * the other route takes that its upstream server (origin) receives as a path of the exposed
   * route. With one upstream for `/` and for `/api` that strips its prefix, `/users` by `/` is what
   * `/api/users` is, without `/api`'s scopes (Kong's strip_path has the same pitfall); so with two
   * base paths on one upstream server (`/` to `http://svc` beside `/api` to `http://svc/internal`:
   * `/internal/api/x`). Told at start, and by `config check`; not refused: an upstream may serve
   * only some of those paths, or check something of its own.
   */
  exposures(): RouteExposure[] {
    const found: RouteExposure[] = []
    for (const a of this.routes) {
      if (a.scopes.length === 0) continue
      // A path of a's upstream, as a sends it (its base path, and its prefix unless stripped),
      // found with a segment no route's prefix can hold (`#`), so no third route takes it; told
      // with `x`.
      const routeProbe = a.prefix === '/' ? '/#' : `${a.prefix}/#`
      const probe = this.upstreamPath(a, routeProbe)
      for (const b of this.routes) {
        // A key that passes b holds one of b's scopes: where each is one of a's, it passes a too.
        if (b === a || b.origin !== a.origin || (b.scopes.length > 0 && b.scopes.every((s) => a.scopes.includes(s)))) continue
        // Routes of different hosts, one of them sending its Host on: the upstream may serve each
        // host its own paths (virtual hosts), and told apart so, neither reaches the other's.
        if (a.host !== b.host && (a.preserveHost || b.preserveHost)) continue
        const byPath = clientPath(b, probe)
        if (byPath === undefined || this.match(b.host, byPath) !== b) continue
        found.push({ route: a.name, routePath: told(routeProbe), by: b.name, byPath: told(byPath), upstreamPath: told(probe) })
      }
    }
    return found
  }

  /** The path sent upstream for `target` on route `r`. */
  upstreamPath(r: CompiledRoute, target: string): string {
    let rest = target
    if (r.stripPrefix && r.prefix !== '/') {
      rest = target.slice(r.prefix.length)
      if (rest === '' || rest.charCodeAt(0) === 63 /* ? */) rest = '/' + rest
    }
    return r.basePath === '' ? rest : r.basePath + rest
  }
}

const ABSOLUTE_HTTP = /^https?:\/\//i
/** Text a Location is rewritten from only when it is all visible ASCII (no byte a URL parser would encode or drop). */
const VISIBLE_ASCII = /^[!-~]+$/

/**
 * The `Location` the client gets for an upstream's `location` on route `r`: one naming the
 * upstream's own URL (its origin, and a path under its base path) as the path the client would
 * send for it, upstreamPath's inverse (`http://10.0.0.5:8080/base/x?y` on a route `/svc` with
 * strip_prefix and upstream `http://10.0.0.5:8080/base` is `/svc/x?y`), after `outerPrefix` (a
 * trusted proxy's X-Forwarded-Prefix, or ''); undefined for any other, which passes as sent. A
 * path-absolute `/x` is left alone: the upstream may have built it from X-Forwarded-Prefix
 * already, and it names no unreachable address.
 *
 * Only a Location whose path and query a URL parser leaves as written is rewritten, its own text
 * kept: one with bytes outside visible ASCII (undici reads them as latin1, and the parser
 * re-encoded them: mojibake), a backslash, dot segments or anything else the parser would change
 * passes as sent; and never into a path beginning `//`, which a client reads as another host (an
 * upstream's `http://self//evil.example/` would have become an open redirect). Both found by a
 * review.
 */
export function publicLocation(r: CompiledRoute, given: string, outerPrefix = ''): string | undefined {
  // A scheme-relative `//host/x` names the upstream's scheme (found by a review: it passed, the
  // upstream's address with it).
  const location = given.startsWith('//') ? r.origin.slice(0, r.origin.indexOf(':') + 1) + given : given
  if (!ABSOLUTE_HTTP.test(location) || !VISIBLE_ASCII.test(location)) return undefined
  let url: URL
  try {
    url = new URL(location)
  } catch {
    return undefined
  }
  if (url.origin !== r.origin) return undefined
  // The text after the authority, as written: the parser's reading of it must be the same text.
  const start = location.indexOf('//') + 2
  const end = location.slice(start).search(/[/?#]/)
  const written = end === -1 ? '' : location.slice(start + end)
  const path = url.pathname
  if (written !== path + url.search + url.hash && !(written === '' && path === '/')) return undefined
  const routePath = clientPath(r, path)
  if (routePath === undefined) return undefined
  const publicPath = outerPrefix + routePath
  if (publicPath.startsWith('//')) return undefined
  return publicPath + url.search + url.hash
}

/** The path a client sends on route `r` for the upstream to receive `upstreamPath` (upstreamPath's inverse): under the route's base path, its prefix put back where it strips it; undefined for a path outside the base path. */
function clientPath(r: CompiledRoute, upstreamPath: string): string | undefined {
  if (r.basePath !== '' && !under(upstreamPath, r.basePath)) return undefined
  let rest = upstreamPath.slice(r.basePath.length)
  if (!rest.startsWith('/')) rest = '/' + rest
  return (r.forwardedPrefix ?? '') + rest
}

/** How specific a route's host is: a Host with its port (2), a Host (1), any host (0); at equal prefix length the more specific route is taken. */
function hostSpecificity(r: CompiledRoute): number {
  return r.hostHasPort ? 2 : r.host !== undefined ? 1 : 0
}

/** An exposure's probe path (Router.exposures) as told: `x` for its `#`. */
function told(path: string): string {
  return path.replace(/#$/, 'x')
}

/** Whether `path` is under `prefix`: equal, or continued on a segment boundary (`/api` holds `/api`, `/api/x` and `/api?q`, not `/apix`). */
function under(path: string, prefix: string): boolean {
  if (!path.startsWith(prefix)) return false
  if (prefix.length <= 1 || path.length === prefix.length) return true
  const next = path.charCodeAt(prefix.length)
  return next === 47 /* / */ || next === 63 /* ? */
}

/** Whether `path` is `prefix` itself (a query or a trailing `/` after it aside). */
function exactly(path: string, prefix: string): boolean {
  if (!path.startsWith(prefix)) return false
  const rest = path.slice(prefix.length)
  return rest === '' || rest === '/' || rest.startsWith('?') || rest.startsWith('/?')
}

/** A Host of letters, digits, `-`, `_` and dots, with a port without a leading zero: read alike by the gateway and a URL parser, unless its last label is a number. */
const PLAIN_HOST = /^[A-Za-z0-9_.-]+(?::[1-9][0-9]*)?$/
/** A name whose last label (a trailing dot aside) a URL parser reads as a number, and the whole name as an IPv4 address. */
const NUMBER_LABEL = /(?:^|\.)(?:[0-9]+|0x[0-9a-f]*)\.?$/i

/** An IPv4 address in its one plain form (four decimal numbers to 255, no leading zero), which a URL parser reads as written. */
const DOTTED_QUAD = /^(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/

/**
 * Whether a URL parser reads `host` as the gateway does (canonicalHost), so that it need not be
 * read again. A plain IPv4 address too: probes and clients that reach a pod by its address sent
 * every request through `new URL` (found by a review).
 */
function plainHost(host: string): boolean {
  if (!PLAIN_HOST.test(host)) return false
  const name = hostName(host)
  return !NUMBER_LABEL.test(name) || DOTTED_QUAD.test(name)
}

/**
 * `host` as `new URL('http://' + host)` reads it (its host, and a port where `host` writes one,
 * http's default included, which the parser drops: `a:080` is `a:80`); undefined where the parser
 * takes no such host, which such an upstream cannot serve either.
 */
function urlHost(host: string): string | undefined {
  let url: URL
  try {
    url = new URL(`http://${host}`)
  } catch {
    return undefined
  }
  const port = url.port !== '' ? url.port : host.length > hostName(host).length + 1 ? '80' : ''
  return port === '' ? url.hostname : `${url.hostname}:${port}`
}

/** Characters of a path that some upstream reads otherwise than as sent. */
const LENIENT_CHANGES = /[%;\\A-Z. ]|\/\//

/**
 * The path a URL parser reads in `path` (its escapes decoded) when it begins with `//` or `/\`, a
 * network-path reference: what follows the authority (`/api/admin` of `//evil/api/admin`; `/` when
 * nothing does), the slashes after the first two skipped as WHATWG URL skips them. Undefined for any
 * other path.
 */
function pathAfterAuthority(path: string): string | undefined {
  const second = path.charCodeAt(1)
  if (path.charCodeAt(0) !== 47 /* / */ || (second !== 47 && second !== 92 /* \ */)) return undefined
  const authority = path.slice(2).replace(/^[/\\]+/, '')
  const end = authority.search(/[/\\]/)
  return end === -1 ? '/' : authority.slice(end)
}

export function grants(keyScopes: readonly string[], routeScopes: readonly string[]): boolean {
  for (const need of routeScopes) {
    for (const have of keyScopes) {
      // No bare `*`: the scope schema refuses it, so a key for every route holds each route's scope.
      if (have === need) return true
      if (have.endsWith(':*') && need.startsWith(have.slice(0, -1))) return true
    }
  }
  return false
}

/** A Connection header that names no other header. */
const PLAIN_CONNECTION = /^\s*(?:keep-alive|close)\s*$/i

/**
 * A browser's CORS preflight on a route with `cors_preflight`, sent on to the upstream without a
 * key: OPTIONS with Origin and Access-Control-Request-Method, and no credential in any of the key
 * sources (a browser sends none on a preflight; one that carries a key is checked as any request).
 * Only an ordinary request (an upgrade is never a preflight), and only on the route the request
 * plainly falls under (a path another route could be read as goes the usual way, to its 401). The
 * stages before it (deny list, lockout, per-address limit) have passed; it reaches the upstream
 * without identity headers. Without it a cross-origin call that sends its key in a header (any
 * header but the CORS-safelisted ones is preflighted) was refused before the browser made it.
 */
export function createPreflightStage(router: Router, sources: KeySources): Stage {
  const { header, authorization } = sources
  const param = sources.query ? sources.queryParam : undefined
  return (s: RequestState) => {
    const h = s.headers
    if (s.res === undefined || s.req.method !== 'OPTIONS' || h.origin === undefined || h['access-control-request-method'] === undefined) return undefined
    // Only what a browser sends (found by an attack review): no body, which went to the upstream
    // keyless (an upstream answering the preflight without reading it parsed it as a request of
    // the sender's choosing, forged identity headers and all; a dripping one held an upstream
    // connection), no Upgrade or Expect, and no Connection naming headers, which the forwarder
    // drops (`Connection: Access-Control-Request-Method` checked here, gone upstream, made an
    // OPTIONS the upstream's CORS layer passed to its handler).
    if (hasBody(h) || h.upgrade !== undefined || h.expect !== undefined || (h.connection !== undefined && !PLAIN_CONNECTION.test(h.connection))) return undefined
    if (authorization && h.authorization !== undefined) return undefined
    // The API key header in any spelling, as the forwarder reads it (`X_API_KEY` reaches PHP as the same variable).
    if (header !== undefined && Object.keys(h).some((k) => isApiKeyHeader(sources, k))) return undefined
    const q = param === undefined ? -1 : s.target.indexOf('?')
    if (q !== -1 && new URLSearchParams(s.target.slice(q + 1)).has(param as string)) return undefined
    const r = router.match(h.host, s.target)
    if (r === undefined || !r.corsPreflight || router.ambiguous(h.host, s.target, r, s.pathBytes) || router.hostAmbiguous(h.host, s.target, r)) return undefined
    if (s.peerTrusted && router.forwardedHostAmbiguous(h['x-forwarded-host'], s.target, r)) return undefined
    s.route = r
    return FORWARD_NOW
  }
}

export function createRouteStage(router: Router): Stage {
  return (s: RequestState) => {
    const r = router.match(s.headers.host, s.target)
    if (r === undefined) return 'route_not_found'
    s.route = r
    if (router.ambiguous(s.headers.host, s.target, r, s.pathBytes)) {
      s.message = 'The request path would fall under another route as some servers read it (percent-encoding, ";" parameters, "//", "\\", letter case, fullwidth and other compatibility forms, leading spaces or trailing dots in a segment, or a format suffix such as ".json"); send it in its plain form.'
      return 'bad_request'
    }
    if (router.hostAmbiguous(s.headers.host, s.target, r)) {
      s.message = "The Host would name another route's host as URL parsers read it (percent-escapes, an IPv4 address in another form, a port with a leading zero); send it in its plain form."
      return 'bad_request'
    }
    if (s.peerTrusted && router.forwardedHostAmbiguous(s.headers['x-forwarded-host'], s.target, r)) {
      s.message = 'X-Forwarded-Host names another route than Host does; the proxy in front must send the host it was asked for in both.'
      return 'bad_request'
    }
    if (r.scopes.length === 0) return undefined
    const k = s.key as CachedKey
    const set = k.scopes
    let grant = set.routeGrant[r.index]
    if (grant === 0) {
      grant = grants(set.list, r.scopes) ? 1 : 2
      set.routeGrant[r.index] = grant
    }
    return grant === 1 ? undefined : 'scope_denied'
  }
}
