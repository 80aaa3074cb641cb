// How a route's path and host are compared: by the gateway when it matches a request, and by
// the configuration check, which refuses two routes the gateway would take for one (the first
// would win, and the second, with its scopes, would never be used).
import { hostName } from '../core/http.ts'

/** The prefix a route's path matches as: without one trailing slash (`/api/` is `/api`); `/` as it is. */
export function routePrefix(path: string): string {
  return path.length > 1 && path.endsWith('/') ? path.slice(0, -1) : path
}

/**
 * Host as routes compare it: lower case, and without the one trailing dot of a fully qualified
 * name (`admin.local.` is `admin.local`, with or without a port). Name-based virtual hosts
 * (nginx, Apache) drop that dot; kept here, `Host: admin.local.` missed the admin.local route,
 * and its scope, and was forwarded by a route for any host to the same upstream. A request's
 * Host and a route's `host` alike: a route written `admin.local.` never matched (found by a
 * review).
 */
export function canonicalHost(host: string): string {
  const lower = host.toLowerCase()
  const name = hostName(lower)
  return name.endsWith('.') ? name.slice(0, -1) + lower.slice(name.length) : lower
}

/** The Host a route matches, as requests' are compared (canonicalHost). */
export function routeHost(host: string | undefined): string | undefined {
  return host === undefined ? undefined : canonicalHost(host)
}
