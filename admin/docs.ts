// Interactive docs at /docs: Swagger UI from the swagger-ui-dist package (no CDN), reading
// /openapi.json. The page has no inline script, so a strict Content-Security-Policy holds. The
// bearer credential typed into "Authorize" lives in the page alone (persistAuthorization off):
// kept in local storage, it stayed on disk with no end, readable by whatever later serves the
// origin (another local server on the port once keygate is stopped; found by a review).
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import type { AdminRoute } from './server.ts'

const DIST = dirname(createRequire(import.meta.url).resolve('swagger-ui-dist/package.json'))

const PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>keygate admin API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
`

const INIT = `window.ui = SwaggerUIBundle({
  url: '/openapi.json',
  dom_id: '#swagger-ui',
  deepLinking: true,
  persistAuthorization: false,
  presets: [SwaggerUIBundle.presets.apis],
});
`

const ASSETS: Record<string, string> = {
  'swagger-ui.css': 'text/css; charset=utf-8',
  'swagger-ui-bundle.js': 'text/javascript; charset=utf-8',
  'favicon-32x32.png': 'image/png',
  'favicon-16x16.png': 'image/png',
}

const SECURITY = {
  'content-security-policy': "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
}

function send(body: Buffer, type: string, cache: string): AdminRoute['handle'] {
  return ({ res, req }) => {
    res.writeHead(200, { 'content-type': type, 'content-length': body.length, 'cache-control': cache, ...SECURITY })
    res.end(req.method === 'HEAD' ? undefined : body)
  }
}

/** The /docs page, its initializer and the Swagger UI assets, read once from the package. */
export function docsRoutes(): AdminRoute[] {
  const page = send(Buffer.from(PAGE), 'text/html; charset=utf-8', 'no-cache')
  const routes: AdminRoute[] = [
    // Also with a trailing slash, as a browser's address bar often completes it (before, 404;
    // found by a review): the page names its assets by absolute paths, so both serve it alike.
    { method: 'GET', path: '/docs', handle: page },
    { method: 'GET', path: '/docs/', handle: page },
    { method: 'GET', path: '/docs/init.js', handle: send(Buffer.from(INIT), 'text/javascript; charset=utf-8', 'no-cache') },
  ]
  for (const [file, type] of Object.entries(ASSETS)) {
    routes.push({ method: 'GET', path: `/docs/${file}`, handle: send(readFileSync(join(DIST, file)), type, 'public, max-age=86400') })
  }
  return routes
}
