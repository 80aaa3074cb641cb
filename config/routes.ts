// How a route's path and host are compared: by the gateway when it matches a request, and by
// the configuration check, which refuses two routes the gateway would take for one (the first
// would win, and the second, with its scopes, would never be used).

/** The prefix a route's path matches as: without one trailing slash (`/api/` is `/api`); `/` as it is. */
export function routePrefix(path: string): string {
  return path.length > 1 && path.endsWith('/') ? path.slice(0, -1) : path
}

/** The Host a route matches, in lower case: request Hosts are compared in lower case. */
export function routeHost(host: string | undefined): string | undefined {
  return host?.toLowerCase()
}
