// Routes: the longest matching path prefix wins (on a segment boundary: /api matches /api,
// /api/x and /api?q, not /apix); at equal length a route naming the Host wins over one that
// does not. Then the scope check: a route with scopes needs a key holding any one of them;
// a key scope `*` grants every scope and `orders:*` every scope starting with `orders:`.
import type { RouteConfig } from '../config/schema.ts'
import type { CachedKey } from './key-cache.ts'
import type { RequestState, Stage } from './state.ts'

export interface CompiledRoute {
  readonly index: number
  readonly name: string
  readonly prefix: string
  /** Lowercase; compared with the port when it has one, else with the host name only. */
  readonly host: string | undefined
  readonly hostHasPort: boolean
  readonly origin: string
  /** Path of the upstream URL without its trailing slash ('' for none). */
  readonly basePath: string
  readonly timeoutMs: number
  readonly scopes: readonly string[]
  readonly stripPrefix: boolean
  readonly preserveHost: boolean
}

function hostName(host: string): string {
  const colon = host.lastIndexOf(':')
  return colon > host.lastIndexOf(']') ? host.slice(0, colon) : host
}

export class Router {
  readonly routes: readonly CompiledRoute[]
  readonly #ordered: readonly CompiledRoute[]
  /** Some route matches on the host: only then is Host lower-cased per request. */
  readonly #byHost: boolean

  constructor(routes: readonly RouteConfig[]) {
    this.routes = routes.map((r, index) => {
      const url = new URL(r.upstream)
      const host = r.host?.toLowerCase()
      return {
        index,
        name: r.name,
        prefix: r.path.length > 1 && r.path.endsWith('/') ? r.path.slice(0, -1) : r.path,
        host,
        hostHasPort: host !== undefined && hostName(host) !== host,
        origin: url.origin,
        basePath: url.pathname === '/' ? '' : url.pathname.replace(/\/$/, ''),
        timeoutMs: r.timeout_ms,
        scopes: r.scopes,
        stripPrefix: r.strip_prefix,
        preserveHost: r.preserve_host,
      }
    })
    this.#byHost = this.routes.some((r) => r.host !== undefined)
    this.#ordered = [...this.routes].sort((a, b) => b.prefix.length - a.prefix.length || (a.host ? 0 : 1) - (b.host ? 0 : 1))
  }

  match(host: string | undefined, target: string): CompiledRoute | undefined {
    const lower = this.#byHost ? host?.toLowerCase() : undefined
    for (const r of this.#ordered) {
      const p = r.prefix
      if (!target.startsWith(p)) continue
      if (p.length > 1 && target.length > p.length) {
        const next = target.charCodeAt(p.length)
        if (next !== 47 /* / */ && next !== 63 /* ? */) continue
      }
      if (r.host !== undefined && (lower === undefined || (r.hostHasPort ? lower : hostName(lower)) !== r.host)) continue
      return r
    }
    return undefined
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

export function grants(keyScopes: readonly string[], routeScopes: readonly string[]): boolean {
  for (const need of routeScopes) {
    for (const have of keyScopes) {
      if (have === need || have === '*') return true
      if (have.endsWith(':*') && need.startsWith(have.slice(0, -1))) return true
    }
  }
  return false
}

export function createRouteStage(router: Router): Stage {
  return (s: RequestState) => {
    const r = router.match(s.headers.host, s.target)
    if (r === undefined) return 'route_not_found'
    s.route = r
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
