// loadConfig: defaults, sources and their precedence, strictness, one specific message per
// problem (all of them at once, secrets hidden), and the generated configuration docs.
import t from 'tap'
import { Router } from '../gateway/route.ts'
import { runCli } from './helpers/cli.ts'
import { execFileSync } from 'node:child_process'
import { generateKeyPairSync } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Kind, type TSchema } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import { parse, parseAllDocuments, stringify } from 'yaml'
import type { Test } from 'tap'
import { ENV_NAMES, FLAG_NAMES, loadConfig, MAX_CONFIG_BYTES, renderConfigDocs, schemaLeaves, unknownEnvNames, type LoadOptions } from '../config/load.ts'
import { ConfigSchema, type Config } from '../config/schema.ts'
import { describeAllowed, dotted, NAME_TEXT, showValue } from '../core/validate.ts'

const LEAVES = schemaLeaves()
const VALID_KEY = Buffer.alloc(32, 1).toString('base64')

function tempDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-config-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

function yamlFile(t: Test, content: unknown, name = 'keygate.yaml'): string {
  const file = join(tempDir(t), name)
  writeFileSync(file, typeof content === 'string' ? content : stringify(content))
  return file
}

/** A document with `value` at `path`; a path step '0' is the first item of a list. */
function build(path: readonly string[], value: unknown): unknown {
  const [head, ...rest] = path
  if (head === undefined) return value
  return head === '0' ? [build(rest, value)] : { [head]: build(rest, value) }
}

/** The problems loadConfig reports, or [] when it accepts. */
function problemsOf(options: LoadOptions): { problems: string[]; message: string; details: string; code: string } {
  try {
    loadConfig(options)
    return { problems: [], message: '', details: '', code: '' }
  } catch (err) {
    const e = err as { code?: string; message: string; details?: { problems?: string[] } }
    if (e.code !== 'config_invalid' && e.code !== 'usage_error') throw err
    return { problems: e.details?.problems ?? [], message: e.message, details: JSON.stringify(e.details), code: e.code }
  }
}

const noFile = { env: {}, onlyFile: true } satisfies LoadOptions

/** `problems` are one for each of `patterns`, in order, and no more: t.match alone takes a list that starts with them. */
function onlyProblems(t: Test, problems: readonly string[], patterns: readonly RegExp[], message = 'the problems'): void {
  t.match(problems, patterns, message)
  t.equal(problems.length, patterns.length, `${message}: no more`, { problems })
}

t.test('defaults', async (t) => {
  const c = loadConfig(noFile)
  t.equal(c.gateway.listen, '0.0.0.0:8080')
  t.equal(c.admin.listen, '127.0.0.1:8081')
  t.equal(c.cache.ttl_s, 300, 'CACHE_TTL_SECONDS=300')
  t.equal(c.cache.max_capacity, 10_000, 'CACHE_MAX_CAPACITY=10000')
  t.equal(c.lockout.max_attempts, 5, 'RATE_LIMIT_MAX_ATTEMPTS=5')
  t.equal(c.lockout.window_s, 900, 'RATE_LIMIT_WINDOW_SECONDS=900')
  t.same(c.gateway.key_sources, ['authorization', 'x-api-key'])
  t.same(c.gateway.trusted_proxies, [])
  t.equal(c.gateway.keep_alive_timeout_ms, 75_000, "above AWS ALB's idle timeout of 60 s (Node's own 5 s was below it)")
  t.same(c.keys.grace_hours, { system: 72, user: 24, service: 48, integration: 24, emergency: 0 }, 'SPEC §2 grace periods')
  t.equal(c.keys.prefix, 'kg_')
  t.same(c.rate_limits.per_address, { limit: 1000, window_s: 1 })
  t.same(c.rate_limits.per_key.default, { limit: 100, window_s: 1 })
  t.same(c.rate_limits.per_key.service, { limit: 1000, window_s: 1 })
  t.equal(c.redis.anomaly_channel, 'keygate:anomaly:alerts')
  t.equal(c.store.database_url, undefined, 'embedded store unless DATABASE_URL')
  t.equal(c.store.data_dir, './.keygate')
  t.equal(c.log.level, 'info')
  t.same(c.routes, [])
  t.ok(Value.Check(ConfigSchema, c), 'the defaults satisfy the schema')
  t.same(loadConfig({ file: yamlFile(t, ''), env: {} }), c, 'an empty file means defaults')
})

t.test("SPEC §1's configuration at a glance loads as written (its names are part of the contract)", async (t) => {
  const file = yamlFile(
    t,
    [
      'gateway: { listen: "0.0.0.0:8080", trusted_proxies: ["10.0.0.0/8"], key_sources: [authorization, x-api-key] }',
      'admin:   { listen: "127.0.0.1:8081" }',
      'routes:',
      '  - { name: api, path: /api, upstream: "http://127.0.0.1:3000", timeout_ms: 30000 }',
      'deny_list: ["192.0.2.0/24", "2001:db8::/32"]',
      'rate_limits:',
      '  per_address: { limit: 1000, window_s: 1 }',
      '  per_key: { default: { limit: 100, window_s: 1 }, service: { limit: 1000, window_s: 1 } }',
      '',
    ].join('\n'),
  )
  const c = loadConfig({ file, env: {}, bothListeners: true })
  t.match(c, {
    gateway: { listen: '0.0.0.0:8080' },
    admin: { listen: '127.0.0.1:8081' },
    routes: [{ name: 'api', path: '/api', upstream: 'http://127.0.0.1:3000', timeout_ms: 30_000 }],
    rate_limits: { per_address: { limit: 1000, window_s: 1 }, per_key: { default: { limit: 100, window_s: 1 }, service: { limit: 1000, window_s: 1 } } },
  })
  t.equal(c.routes.length, 1)
  // Compared whole: t.match takes a list that starts with the items given.
  t.same([c.gateway.trusted_proxies, c.gateway.key_sources, c.deny_list], [['10.0.0.0/8'], ['authorization', 'x-api-key'], ['192.0.2.0/24', '2001:db8::/32']], 'the lists as written, no more')
})

t.test('the carried-over environment names', async (t) => {
  const c = loadConfig({ env: { CACHE_TTL_SECONDS: '60', CACHE_MAX_CAPACITY: '500', RATE_LIMIT_MAX_ATTEMPTS: '3', RATE_LIMIT_WINDOW_SECONDS: '120' } })
  t.match(c, { cache: { ttl_s: 60, max_capacity: 500 }, lockout: { max_attempts: 3, window_s: 120 } })
  // The replaced system's anomaly channel, settable where its other names are: the environment.
  t.equal(loadConfig({ env: { KEYGATE_ANOMALY_CHANNEL: 'momentry:anomaly:alerts' } }).redis.anomaly_channel, 'momentry:anomaly:alerts')
})

t.test('redis.key_prefix: empty by default; nothing a SCAN pattern would read as a glob', async (t) => {
  t.equal(loadConfig({ env: {} }).redis.key_prefix, '')
  t.equal(loadConfig({ env: { KEYGATE_REDIS_KEY_PREFIX: 'staging-2.eu:' } }).redis.key_prefix, 'staging-2.eu:')
  for (const bad of ['a*', 'a?', '[a]', 'a\\b', 'has space', 'x'.repeat(101)]) {
    onlyProblems(t, problemsOf({ env: { KEYGATE_REDIS_KEY_PREFIX: bad } }).problems, [/^KEYGATE_REDIS_KEY_PREFIX \(redis\.key_prefix\): .* is not allowed; expected letters, digits and _ \. : -, at most 100/], JSON.stringify(bad))
  }
})

t.test('precedence: file, then environment, then flags', async (t) => {
  const file = yamlFile(t, { gateway: { listen: '0.0.0.0:1111' }, admin: { listen: '127.0.0.1:1112' }, cache: { ttl_s: 11 }, log: { level: 'warn' } })
  const env = { KEYGATE_LISTEN: '0.0.0.0:2221', CACHE_TTL_SECONDS: '22' }
  const flags = { listen: '0.0.0.0:3331' }
  t.match(loadConfig({ file, env: {} }), { gateway: { listen: '0.0.0.0:1111' }, admin: { listen: '127.0.0.1:1112' }, cache: { ttl_s: 11 }, log: { level: 'warn' } })
  t.match(loadConfig({ file, env }), { gateway: { listen: '0.0.0.0:2221' }, admin: { listen: '127.0.0.1:1112' }, cache: { ttl_s: 22 } }, 'env over file')
  t.match(loadConfig({ file, env, flags }), { gateway: { listen: '0.0.0.0:3331' }, cache: { ttl_s: 22 } }, 'flags over env')
  t.match(loadConfig({ file, env: { KEYGATE_LISTEN: '' }, flags: { listen: undefined } }), { gateway: { listen: '0.0.0.0:1111' } }, 'empty values do not override')
  t.match(loadConfig({ file, env, onlyFile: true }), { gateway: { listen: '0.0.0.0:1111' }, cache: { ttl_s: 11 } }, 'onlyFile ignores the environment')

  const other = yamlFile(t, { cache: { ttl_s: 33 } })
  t.equal(loadConfig({ env: { KEYGATE_CONFIG: other } }).cache.ttl_s, 33, 'KEYGATE_CONFIG names the file')
  t.equal(loadConfig({ file, env: { KEYGATE_CONFIG: other } }).cache.ttl_s, 11, 'an explicit file wins over KEYGATE_CONFIG')
  t.equal(loadConfig({ env: { KEYGATE_CONFIG: other }, onlyFile: true }).cache.ttl_s, 300, 'onlyFile ignores KEYGATE_CONFIG')

  const cwd = process.cwd()
  const dir = tempDir(t)
  writeFileSync(join(dir, 'keygate.yaml'), 'cache: { ttl_s: 44 }\n')
  process.chdir(dir)
  t.teardown(() => process.chdir(cwd))
  t.equal(loadConfig({ env: {} }).cache.ttl_s, 44, './keygate.yaml when present')
  t.equal(loadConfig({ env: { KEYGATE_CONFIG: other } }).cache.ttl_s, 33, 'KEYGATE_CONFIG before ./keygate.yaml')
})

t.test('every flag sets its leaf', async (t) => {
  const values: Record<string, string> = {
    listen: '0.0.0.0:9000',
    'admin-listen': '127.0.0.1:9001',
    'admin-url': 'http://127.0.0.1:9001',
    upstream: 'http://127.0.0.1:3000',
    'database-url': 'postgres://u@db/keygate',
    'data-dir': '/var/lib/keygate',
    'gitea-url': 'https://git.example/gitea',
    'gitea-username': 'ci-bot',
    'gitea-password': 'flag-password',
    'n8n-url': 'http://127.0.0.1:5678',
    'n8n-email': 'ops@example.test',
    'n8n-password': 'flag-password-2',
  }
  t.same([...FLAG_NAMES].sort(), Object.keys(values).sort(), 'the flags tested are the flags declared')
  // --data-dir beside a database URL is refused (test/cli-input.test.ts): each without the other.
  for (const without of ['data-dir', 'database-url']) {
    const c = loadConfig({ env: {}, flags: Object.fromEntries(Object.entries(values).filter(([name]) => name !== without)) })
    for (const leaf of LEAVES.filter((l) => l.flag !== undefined && l.flag !== without)) {
      t.equal(leaf.path.reduce<unknown>((node, k) => (node as Record<string, unknown>)[k], c), values[leaf.flag as string], `--${leaf.flag}`)
    }
  }
})

t.test('the result is deep-frozen', async (t) => {
  const c = loadConfig({ env: { KEYGATE_UPSTREAM: 'http://127.0.0.1:3000', KEYGATE_TRUSTED_PROXIES: '10.0.0.0/8' } })
  const unfrozen: string[] = []
  const walk = (v: unknown, path: string) => {
    if (v === null || typeof v !== 'object') return
    if (!Object.isFrozen(v)) unfrozen.push(path)
    for (const [k, x] of Object.entries(v)) walk(x, `${path}.${k}`)
  }
  walk(c, 'config')
  t.same(unfrozen, [])
  t.throws(() => {
    ;(c.gateway as { listen: string }).listen = 'x'
  }, TypeError)
  t.throws(() => (c.routes as Config['routes']).push(c.routes[0] as Config['routes'][number]), TypeError)
  t.throws(() => {
    ;(c.gateway.trusted_proxies as string[])[0] = '0.0.0.0/0'
  }, TypeError)
})

/** Every object in the schema, with a path to put an unknown key in. */
function objectPaths(schema: TSchema, path: string[] = []): string[][] {
  if (schema[Kind] === 'Object') {
    return [path, ...Object.entries(schema.properties as Record<string, TSchema>).flatMap(([k, s]) => objectPaths(s, [...path, k]))]
  }
  if (schema[Kind] === 'Array' && (schema.items as TSchema)[Kind] === 'Object') return objectPaths(schema.items as TSchema, [...path, '0'])
  return []
}

t.test('unknown keys are errors at every level', async (t) => {
  const paths = objectPaths(ConfigSchema)
  t.ok(paths.length >= 20, `${paths.length} objects`)
  for (const path of paths) {
    const doc = build([...path, 'colour'], 'red')
    const where = dotted([...path, 'colour'])
    const { problems } = problemsOf({ file: yamlFile(t, doc), env: {} })
    const line = problems.find((p) => p.startsWith(`${where}:`))
    t.ok(line, `${where} is refused`)
    t.match(line, /unknown key; allowed here: \w/, `${where}: names the keys allowed`)
  }
})

t.test('a list where a mapping belongs, or a mapping where a list belongs, is refused', async (t) => {
  // Regression: defaults were merged into such values, so `routes: {api: ...}` loaded as no routes.
  for (const path of objectPaths(ConfigSchema).filter((p) => p.length > 0 && !p.includes('0'))) {
    for (const value of [[], ['x'], [{ a: 1 }]]) {
      const where = dotted(path)
      const { problems } = problemsOf({ file: yamlFile(t, build(path, value)), env: {} })
      // A section that holds a secret does not show what was written in its place.
      const holdsSecret = LEAVES.some((l) => l.secret && path.every((p, i) => p === l.path[i]))
      t.same(problems, [`${where}: ${holdsSecret ? '<hidden>' : JSON.stringify(value)} is not allowed; expected a mapping with the keys ${Object.keys((schemaAtPath(path) as TSchema).properties as object).join(', ')}`], `${where} = ${JSON.stringify(value)}`)
    }
  }
  t.same(problemsOf({ file: yamlFile(t, 'routes:\n  api: { path: /api, upstream: "http://127.0.0.1:1" }\n'), env: {} }).problems, [
    'routes: {"api":{"path":"/api","upstream":"http://127.0.0.1:1"}} is not allowed; expected a list of mappings, each with the keys name, path, host, upstream, timeout_ms, keepalive_timeout_ms, scopes, strip_prefix, preserve_host, rewrite_redirects, cors_preflight',
  ])
  t.same(problemsOf({ file: yamlFile(t, { routes: [{ name: 'a', path: '/', upstream: 'http://127.0.0.1:1', scopes: { admin: true } }] }), env: {} }).problems, [
    'routes[0].scopes: {"admin":true} is not allowed; expected a list of scope names as keys hold them, such as admin or orders:read (a lowercase letter or digit, then up to 63 of a-z 0-9 : . _ * -), and no wildcard such as orders:* (a key\'s orders:* grants every orders: scope; a route names the one it needs)',
  ])
  t.same(problemsOf({ file: yamlFile(t, { routes: [['a']] }), env: {} }).problems, [
    'routes[0]: ["a"] is not allowed; expected a mapping with the keys name, path, host, upstream, timeout_ms, keepalive_timeout_ms, scopes, strip_prefix, preserve_host, rewrite_redirects, cors_preflight',
  ])
})

function schemaAtPath(path: readonly string[]): TSchema | undefined {
  return path.reduce<TSchema | undefined>((s, k) => (s ? ((s.properties as Record<string, TSchema> | undefined)?.[k] ?? undefined) : undefined), ConfigSchema)
}

/** Wrong-typed values for a leaf, by what it is; for strings with a format, also a malformed string. */
function wrongValues(schema: TSchema): unknown[] {
  switch (schema[Kind]) {
    case 'Integer':
      return ['many', 1.5, (schema.maximum as number) + 1, (schema.minimum as number) - 1]
    case 'Boolean':
      return ['maybe', 1]
    case 'String':
      // A free text (store.data_dir) refuses only what shows nothing.
      return [12345, ...(schema.format || schema.pattern ? [schema.pattern === NAME_TEXT ? ' ' : 'not valid!'] : []), ...(schema.minLength ? [''] : [])]
    case 'Array':
      return ['not-a-list', { a: 1 }]
    case 'Union':
      return ['verbose', 3]
    default:
      throw new Error(`no wrong values for a ${String(schema[Kind])} leaf`)
  }
}

t.test('every leaf: a wrong value in the file names the path, the value and what is allowed', async (t) => {
  let checked = 0
  for (const leaf of LEAVES) {
    const key = dotted(leaf.path)
    const allowed = describeAllowed(leaf.schema)
    t.not(allowed, 'a valid value', `${key}: what is allowed is described`)
    for (const value of wrongValues(leaf.schema)) {
      const { problems } = problemsOf({ file: yamlFile(t, build(leaf.path, value)), env: {} })
      const line = problems.find((p) => p.startsWith(`${key}: `))
      if (!line) {
        t.fail(`${key} = ${JSON.stringify(value)} was not refused`, { problems })
        continue
      }
      t.ok(line.includes(`expected ${allowed}`), `${key} = ${JSON.stringify(value)}: says what is allowed`, { line })
      if (leaf.secret) {
        t.ok(line.includes('<hidden>'), `${key}: the value is hidden`, { line })
        if (typeof value === 'string' && value.length > 3) t.notOk(line.includes(value), `${key}: secret not shown`)
      } else {
        t.ok(line.includes(`${showValue(value)} is not allowed`), `${key} = ${JSON.stringify(value)}: names the value`, { line })
      }
      checked++
    }
  }
  t.ok(checked > 150, `${checked} wrong values checked`)
  // A few messages spelled out, so the words themselves are checked too.
  const spelled = (doc: unknown) => problemsOf({ file: yamlFile(t, doc), env: {} }).problems
  t.same(spelled({ cache: { ttl_s: 'soon' } }), ['cache.ttl_s: "soon" is not allowed; expected an integer from 1 to 86400'])
  t.same(spelled({ gateway: { listen: 'localhost' } }), ['gateway.listen: "localhost" is not allowed; expected host:port, such as 0.0.0.0:8080 or [::1]:8080'])
  t.same(spelled({ log: { level: 'verbose' } }), ['log.level: "verbose" is not allowed; expected one of debug, info, warn, error'])
  t.same(spelled({ keys: { accept_legacy: 'yes' } }), ['keys.accept_legacy: "yes" is not allowed; expected true or false'])
  t.same(spelled({ deny_list: ['192.0.2.0/24', '300.1.1.1'] }), ['deny_list[1]: "300.1.1.1" is not allowed; expected an IPv4 or IPv6 address, or a CIDR range written as its network address, such as 10.0.0.0/8 or 2001:db8::/32'])
  // Host bits set: the entry would deny (trust, allow) the whole network, where one address may
  // have been meant (before, found by a review: loaded as 10.0.0.0/8 without a word).
  t.same(spelled({ deny_list: ['10.1.2.3/8', '2001:db8::7/32', '::ffff:10.1.2.3/104'] }), [
    'deny_list[0]: "10.1.2.3/8" has host bits set: as a range it covers the whole network 10.0.0.0/8; write 10.0.0.0/8 for that network, or 10.1.2.3 alone for the one address',
    'deny_list[1]: "2001:db8::7/32" has host bits set: as a range it covers the whole network 2001:db8::/32; write 2001:db8::/32 for that network, or 2001:db8::7 alone for the one address',
    'deny_list[2]: "::ffff:10.1.2.3/104" has host bits set: as a range it covers the whole network 10.0.0.0/8; write 10.0.0.0/8 for that network, or ::ffff:10.1.2.3 alone for the one address',
  ])
  t.same(spelled({ gateway: { trusted_proxies: ['10.0.0.0/8', '10.1.2.3/8'] }, webhooks: { allow_private: ['fd00::1/8'] } }), [
    'gateway.trusted_proxies[1]: "10.1.2.3/8" has host bits set: as a range it covers the whole network 10.0.0.0/8; write 10.0.0.0/8 for that network, or 10.1.2.3 alone for the one address',
    'webhooks.allow_private[0]: "fd00::1/8" has host bits set: as a range it covers the whole network fd00::/8; write fd00::/8 for that network, or fd00::1 alone for the one address',
  ], 'and in every list of ranges')
  // ipaddr.js alone reads these as other addresses (10.1 is 10.0.0.1, 3221225985 is 192.0.2.1,
  // 010.0.0.1 is 8.0.0.1): an operator who blocks "192.168.1" means a /24, not 192.168.0.1.
  for (const short of ['192.168.1', '10.1', '3221225985', '010.0.0.1', '0x7f.0.0.1', '10.0.0.0/08', '10.0.0.0/+8', '10.0.0.0/33', '2001:db8::/129', '::ffff:0x0a.0.0.1', '::ffff:010.0.0.1', '::ffff:010.0.0.0/104']) {
    t.same(spelled({ gateway: { trusted_proxies: [short] } }), [`gateway.trusted_proxies[0]: "${short}" is not allowed; expected an IPv4 or IPv6 address, or a CIDR range written as its network address, such as 10.0.0.0/8 or 2001:db8::/32`], `${short} is refused`)
  }
  t.same(spelled({ deny_list: ['192.0.2.0/24', '0.0.0.0/0', '::/0', '::ffff:192.0.2.0/120', 'fe80::1%eth0', '::ffff:10.0.0.1'] }), [], 'the usual forms pass')
  t.same(spelled({ scheduler: { usage_retention_days: 7 } }), ['scheduler.usage_retention_days: 7 is not allowed; expected at least anomalies.unusual_hour_history_days (14)'], 'usage rows kept as long as the unusual-hours check learns from them')
  t.same(spelled({ scheduler: { usage_retention_days: 7 }, anomalies: { unusual_hour_history_days: 7 } }), [])
  t.same(spelled({ anomalies: { unusual_hour_history_days: 7, unusual_hour_min_days: 8 } }), ['anomalies.unusual_hour_min_days: 8 is not allowed; expected less than anomalies.unusual_hour_history_days (7)'], 'a span the history read could never hold')
  t.same(
    spelled({ anomalies: { unusual_hour_history_days: 7, unusual_hour_min_days: 7 } }),
    ["anomalies.unusual_hour_min_days: 7 is not allowed; expected less than anomalies.unusual_hour_history_days (7): a history of 7 days spans 7 only where the key was used at the judged hour's time 7 days before, so an hour it does not use would never be judged"],
    'nor one it holds only where the judged hour was used (found by a review: taken before, and the check was silently off)',
  )
  t.same(spelled({ anomalies: { unusual_hour_history_days: 1, unusual_hour_min_days: 0 } }), [], 'no span needed: a history of one day can be judged')
  // Before: accepted, and once the prune took the row the same key, type and window alerted again.
  t.same(
    spelled({ scheduler: { anomaly_retention_days: 1 }, anomalies: { dedupe_window_s: 604_800 } }),
    ['scheduler.anomaly_retention_days: 1 is not allowed; expected at least anomalies.dedupe_window_s in days (604800 s, 7 days)'],
    'anomaly rows kept as long as their dedupe window runs',
  )
  t.same(spelled({ scheduler: { anomaly_retention_days: 7 }, anomalies: { dedupe_window_s: 604_800 } }), [], 'a retention as long as the window')
  t.same(spelled({ scheduler: { anomaly_retention_days: 1 }, anomalies: { dedupe_window_s: 86_400 } }), [])
  // Node refuses to make such a server: said by name at load, not as a start-up crash.
  t.same(spelled({ admin: { headers_timeout_ms: 30_000, request_timeout_ms: 20_000 } }), ['admin.headers_timeout_ms: 30000 is not allowed; expected at most admin.request_timeout_ms (20000): the headers are part of the request'], "the admin listener's header timeout within its request timeout")
  t.same(spelled({ admin: { headers_timeout_ms: 20_000, request_timeout_ms: 20_000 } }), [])
  t.same(spelled({ admin: { headers_timeout_ms: 20_000 } }), [], 'within the default request timeout (60 s)')
  t.same(spelled({ routes: [{ name: 'api', path: '/api', upstream: 'ftp://x' }] }), ['routes[0].upstream: "ftp://x" is not allowed; expected an http:// or https:// URL without user:password@, a query or a fragment'])
  t.same(spelled({ routes: [{ name: 'api', upstream: 'http://x' }] }), ['routes[0].path: is required; expected a path starting with / without ?, #, control characters or dot segments'])
})

/** Leaves set from the environment that accept any non-empty string, so no env value is wrong. */
const ANY_STRING_ENV = ['GITEA_PASSWORD', 'GITEA_USERNAME', 'KEYGATE_DATA_DIR', 'N8N_PASSWORD']

t.test('every environment variable: a bad value names the variable, the value and what is allowed', async (t) => {
  const file = yamlFile(t, '')
  const candidates = ['not valid ☃', 'ab', '-5', '99999999999']
  const noBadValue: string[] = []
  for (const leaf of LEAVES.filter((l) => l.env)) {
    const name = leaf.env as string
    const key = dotted(leaf.path)
    const bad = candidates.map((value) => ({ value, ...problemsOf({ file, env: { [name]: value } }) })).find((r) => r.problems.length > 0)
    if (!bad) {
      noBadValue.push(name)
      continue
    }
    t.equal(bad.problems.length, 1, `${name}: one problem`, { problems: bad.problems })
    const line = bad.problems[0] as string
    t.match(line, new RegExp(`^${name} \\(${key.replace(/[.[\]]/g, '\\$&')}(\\[\\d+\\])?\\): `), `${name}: names the variable and the key`, { line })
    t.match(line, /is not allowed; expected \S/, `${name}: says what is allowed`, { line })
    if (leaf.secret) {
      t.ok(line.includes('<hidden>') && !line.includes(bad.value), `${name}: the value is hidden`, { line })
    } else {
      t.ok(line.includes(JSON.stringify(bad.value)) || line.includes(JSON.stringify(bad.value.split(',')[0])), `${name}: names the value`, { line })
    }
  }
  t.same(noBadValue.sort(), ANY_STRING_ENV, 'only plain-text leaves accept every value')
  t.same(
    problemsOf({ file, env: { CACHE_TTL_SECONDS: '5m' } }).problems,
    ['CACHE_TTL_SECONDS (cache.ttl_s): "5m" is not allowed; expected an integer from 1 to 86400'],
  )
  // Digits past what a number holds exactly are shown as given (before, found by a review, as the
  // number they were read as: 24 digits were `1e+24`, 400 were `.inf`, neither what was set).
  for (const digits of ['9'.repeat(24), '1'.repeat(400), '9007199254740993']) {
    t.same(
      problemsOf({ file, env: { KEYGATE_MAX_CONNECTIONS: digits } }).problems,
      [`KEYGATE_MAX_CONNECTIONS (gateway.max_connections): ${showValue(digits)} is not allowed; expected an integer from 0 to 10000000`],
      `${digits.length} digits`,
    )
  }
  t.equal(loadConfig({ env: { KEYGATE_KEEP_ALIVE_TIMEOUT_MS: '620000' } }).gateway.keep_alive_timeout_ms, 620_000, 'KEYGATE_KEEP_ALIVE_TIMEOUT_MS sets gateway.keep_alive_timeout_ms')
  t.same(problemsOf({ file, env: { KEYGATE_KEEP_ALIVE_TIMEOUT_MS: '500' } }).problems, ['KEYGATE_KEEP_ALIVE_TIMEOUT_MS (gateway.keep_alive_timeout_ms): 500 is not allowed; expected an integer from 1000 to 3600000'], 'under a second is refused (Keep-Alive: timeout=0 would tell clients not to reuse it)')
  t.same(problemsOf({ file, env: { KEYGATE_ACCESS_LOG: 'sometimes' } }).problems, ['KEYGATE_ACCESS_LOG (log.access_log): "sometimes" is not allowed; expected true or false (or 1, yes, on; 0, no, off; in any case)'], 'the words an environment variable takes')
  t.same(problemsOf({ file, env: { LOG_LEVEL: 'trace' } }).problems, ['LOG_LEVEL (log.level): "trace" is not allowed; expected one of debug, info, warn, error'])
  t.same(problemsOf({ file, env: {}, flags: { listen: '8080' } }).problems, ['--listen (gateway.listen): "8080" is not allowed; expected host:port, such as 0.0.0.0:8080 or [::1]:8080'])
  for (const [raw, value] of [['true', true], ['1', true], ['yes', true], ['ON', true], ['TRUE', true], ['False', false], ['false', false], ['0', false], ['no', false], ['off', false]] as const) {
    t.equal(loadConfig({ env: { KEYGATE_ACCESS_LOG: raw } }).log.access_log, value, `KEYGATE_ACCESS_LOG=${raw}`)
  }
  // In any case, as the booleans above (found by a review: LOG_LEVEL=INFO, as many tools take it,
  // stopped every command with config_invalid).
  for (const [raw, level] of [['INFO', 'info'], ['Debug', 'debug'], [' warn ', 'warn'], ['ERROR', 'error']] as const) {
    t.equal(loadConfig({ env: { LOG_LEVEL: raw } }).log.level, level, `LOG_LEVEL=${JSON.stringify(raw)}`)
  }
  t.same(problemsOf({ file, env: { LOG_LEVEL: 'VERBOSE' } }).problems, ['LOG_LEVEL (log.level): "VERBOSE" is not allowed; expected one of debug, info, warn, error'], 'a level of no name still says which are')
  // The file by the same rule (before, found by a review: `level: INFO` was refused there while
  // LOG_LEVEL=INFO was taken).
  for (const [raw, level] of [['INFO', 'info'], ['Debug', 'debug'], [' warn ', 'warn'], ['ERROR', 'error']] as const) {
    t.equal(loadConfig({ file: yamlFile(t, { log: { level: raw } }), env: {} }).log.level, level, `log.level: ${JSON.stringify(raw)} in the file`)
  }
  t.equal(loadConfig({ file: yamlFile(t, { log: { level: 'ERROR' } }), env: { LOG_LEVEL: 'Debug' } }).log.level, 'debug', 'the variable still overrides the file')
  t.same(problemsOf({ file: yamlFile(t, { log: { level: 'VERBOSE' } }), env: {} }).problems, ['log.level: "VERBOSE" is not allowed; expected one of debug, info, warn, error'], 'in the file too, a level of no name is refused as written')
  t.same(problemsOf({ file: yamlFile(t, { log: 'INFO' }), env: {} }).problems, ['log: "INFO" is not allowed; expected a mapping with the keys level, access_log'], 'a section written as a word is not taken for its level')
})

t.test('every problem is reported at once', async (t) => {
  const dir = tempDir(t)
  // Before, the checks that come after the schema's (TLS files, the upstream shortcut, retention)
  // ran only once the schema's problems were fixed.
  const file = yamlFile(t, {
    gateway: { listen: 'nowhere', colour: 'red', tls: { cert: join(dir, 'no-cert.pem'), key: join(dir, 'no-key.pem') } },
    cache: { ttl_s: 0 },
    routes: [{ name: 'Bad Name', path: 'api', upstream: 'http://x' }],
    scheduler: { usage_retention_days: 1 },
  })
  const { problems, message, code } = problemsOf({ file, env: { RATE_LIMIT_MAX_ATTEMPTS: 'lots', LOG_LEVEL: 'loud' }, flags: { 'admin-listen': 'x' } })
  const keys = problems.map((p) => p.split(': ')[0]).sort()
  t.same(keys, [
    '--admin-listen (admin.listen)',
    'LOG_LEVEL (log.level)',
    'RATE_LIMIT_MAX_ATTEMPTS (lockout.max_attempts)',
    'cache.ttl_s',
    'gateway.colour',
    'gateway.listen',
    'gateway.tls.cert',
    'gateway.tls.key',
    'routes[0].name',
    'routes[0].path',
    'scheduler.usage_retention_days',
  ])
  t.match(message, /^invalid configuration:\n {2}/)
  for (const p of problems) t.ok(message.includes(`\n  ${p}`), 'one line per problem in the message')
  t.equal(code, 'usage_error', 'a flag gave a value it never takes: a usage error (exit 2)')
  t.equal(problemsOf({ file, env: {} }).code, 'config_invalid', 'without it: an invalid configuration (exit 1)')
})

t.test('a flag given an empty value is a usage error, not the file\'s or the default value', async (t) => {
  // Before: `--listen=$ADDR` with ADDR unset listened on 0.0.0.0:8080 without a word.
  for (const flag of ['listen', 'admin-listen', 'upstream'] as const) {
    const r = problemsOf({ ...noFile, flags: { [flag]: '' } })
    t.equal(r.code, 'usage_error', flag)
    onlyProblems(t, r.problems, [new RegExp(`^--${flag} \\([a-z.]+\\): an empty value is not allowed; expected `)], flag)
  }
  t.same(problemsOf({ ...noFile, env: { KEYGATE_LISTEN: '' } }).problems, [], 'an empty environment variable is an unset one')
})

t.test('a data folder of only spaces is refused, as an empty one is (found by a review)', async (t) => {
  // Before: `--data-dir " "` (a `"$DIR "` with DIR unset) made a new embedded store in a folder
  // named " " in the working folder, without a word, where an empty --data-dir is refused.
  const byFlag = problemsOf({ ...noFile, flags: { 'data-dir': ' ' } })
  t.equal(byFlag.code, 'usage_error', 'a usage error, from the flag')
  onlyProblems(t, byFlag.problems, [/^--data-dir \(store\.data_dir\): " " is not allowed; expected a non-empty string with something visible \(not only spaces\)/])
  const byEnv = problemsOf({ env: { KEYGATE_DATA_DIR: '\t ' } })
  t.equal(byEnv.code, 'config_invalid', 'an invalid configuration, from the environment')
  onlyProblems(t, byEnv.problems, [/^KEYGATE_DATA_DIR \(store\.data_dir\): "\\t " is not allowed; expected a non-empty string with something visible/])
  onlyProblems(t, problemsOf({ file: yamlFile(t, { store: { data_dir: '  ' } }), env: {} }).problems, [/^store\.data_dir: "  " is not allowed/], 'and from the file')
  t.same(problemsOf({ ...noFile, flags: { 'data-dir': ' my store ' } }).problems, [], 'a folder whose name has spaces is taken')
})

t.test('the admin URL takes no query or fragment, from any source (the CLI adds the operations\' paths to it)', async (t) => {
  // Before: refused only when the CLI called it (exit 1), where every other bad flag is a usage error (exit 2).
  // A query's values are not shown (a token there is as secret as a password before @): the names say what was there.
  for (const [value, shown] of [
    ['http://127.0.0.1:8081/?x=1', 'http://127.0.0.1:8081/?x=<hidden>'],
    ['http://127.0.0.1:8081#top', 'http://127.0.0.1:8081#top'],
    ['http://127.0.0.1:8081/?', 'http://127.0.0.1:8081/?'],
  ] as const) {
    const { problems } = problemsOf({ env: { KEYGATE_ADMIN_URL: value } })
    t.same(problems, [`KEYGATE_ADMIN_URL (admin.url): ${JSON.stringify(shown)} is not allowed; expected an http:// or https:// URL without user:password@, a query or a fragment`], value)
  }
  const flag = await runCli(['api-key', 'list', '--admin-url', 'http://127.0.0.1:1/?x=1'])
  t.equal(flag.code, 2, 'as a flag: a usage error')
  t.same(problemsOf({ env: { KEYGATE_ADMIN_URL: 'https://admin.internal:8443/keygate' } }).problems, [], 'a path prefix is fine')
})

t.test('an upstream URL takes no query or fragment (the gateway adds the request\'s path and query to it)', async (t) => {
  // Before: accepted, and dropped: /q/x?a=1 reached the upstream as /base/q/x?a=1, without tenant=acme.
  const words = 'expected an http:// or https:// URL without user:password@, a query or a fragment'
  // Before (found by a review), the query was shown whole: `token=abc` on stderr, and through a
  // unit's ExecStartPre in the journal, at every start the value stopped.
  for (const [value, shown] of [
    ['http://127.0.0.1:7440/base?tenant=acme&token=abc#frag', 'http://127.0.0.1:7440/base?tenant=<hidden>&token=<hidden>#frag'],
    ['http://127.0.0.1:7440/base?s3cr3tT0ken', 'http://127.0.0.1:7440/base?<hidden>'],
    ['http://127.0.0.1:7440/base#frag', 'http://127.0.0.1:7440/base#frag'],
    ['http://127.0.0.1:7440/?', 'http://127.0.0.1:7440/?'],
  ] as const) {
    const file = yamlFile(t, { routes: [{ name: 'q', path: '/q', upstream: value }] })
    const inFile = problemsOf({ file, env: {} })
    t.same(inFile.problems, [`routes[0].upstream: ${JSON.stringify(shown)} is not allowed; ${words}`], value)
    const inEnv = problemsOf({ env: { KEYGATE_UPSTREAM: value } })
    t.same(inEnv.problems, [`KEYGATE_UPSTREAM (upstream): ${JSON.stringify(shown)} is not allowed; ${words}`], `${value} as KEYGATE_UPSTREAM`)
    t.notMatch(inFile.message + inEnv.message, /abc|s3cr3t|acme/, `${value}: no value of its query is shown`)
  }
  t.same(problemsOf({ env: { KEYGATE_UPSTREAM: 'https://up.example:8443/base/' } }).problems, [], 'a base path is fine')
})

t.test('a URL setting with user:password@ is refused, and the password is not shown', async (t) => {
  // Before, KEYGATE_ADMIN_URL took one, and every failed CLI call printed it (fetch refuses such a URL).
  for (const [name, value] of [
    ['KEYGATE_ADMIN_URL', 'http://bob:hunter2pw@127.0.0.1:8081'],
    ['KEYGATE_UPSTREAM', 'http://svc:upstreamPw9@10.0.0.5:3000'],
    ['GITEA_URL', 'https://admin:giteaPw7@git.example'],
    // A password holding @, a space or a quote (the URL parser takes each): hidden whole.
    ['KEYGATE_UPSTREAM', 'http://u:atPw5@secret@host'],
    ['KEYGATE_UPSTREAM', 'http://u:spacePw6 secret@host'],
    ['KEYGATE_UPSTREAM', 'http://u:quotePw8"secret@host'],
  ] as const) {
    const { problems, message } = problemsOf({ env: { [name]: value } })
    t.equal(problems.length, 1, name)
    t.match(problems[0], new RegExp(`^${name} \\([a-z_.]+\\): "[^"]*<hidden>@[^"]*" is not allowed; expected an http:// or https:// URL without user:password@`), name)
    t.notOk(message.includes(value.split(':')[2]?.split('@')[0] as string), `${name}: the password is not shown`)
    t.notMatch(message, /secret/, `${name}: nor any part of it`)
  }
})

t.test('secret values never appear in messages', async (t) => {
  const secrets = {
    KEYGATE_ADMIN_TOKEN: 'tok-hunter2',
    DATABASE_URL: 'mysql://keygate:hunter2pass@db.internal/keygate',
    REDIS_URL: 'memcache://:redispass77@cache',
    KEYGATE_ENCRYPTION_KEY: 'c2VjcmV0LWtleS1ub3QtMzItYnl0ZXM=',
    KEYGATE_PREVIOUS_ENCRYPTION_KEYS: `${VALID_KEY},prevsecret999`,
  }
  const { problems, message, details } = problemsOf({ env: secrets })
  t.equal(problems.length, 5, 'each bad secret is reported', { problems })
  for (const value of [...Object.values(secrets), 'hunter2', 'redispass77', 'prevsecret999', VALID_KEY]) {
    t.notOk(message.includes(value), `message hides ${value.slice(0, 6)}…`)
    t.notOk(details.includes(value), `details hide ${value.slice(0, 6)}…`)
  }
  t.ok(problems.every((p) => p.includes('<hidden>')))

  const inFile = problemsOf({
    file: yamlFile(t, { admin: { token: 'short-hunter2' }, store: { database_url: 'mysql://u:filepass1@h/db' }, audit: { previous_encryption_keys: ['filesecret2'] }, integrations: { gitea: { password: 5150 } } }),
    env: {},
  })
  t.equal(inFile.problems.length, 4)
  for (const value of ['short-hunter2', 'filepass1', 'filesecret2', '5150']) t.notOk(inFile.message.includes(value), `file value ${value} hidden`)

  // A section that holds a secret, written as a string or a list (the URL or password one level
  // too high): the value is hidden too.
  const misplaced = problemsOf({
    file: yamlFile(t, { store: 'postgres://keygate:PgPassw0rd@db/keygate', redis: ['redis://:R3disPass@cache:6379'], integrations: { gitea: 'giteaPass1' }, audit: 'auditKey2', admin: 'adminTok3' }),
    env: {},
  })
  t.equal(misplaced.problems.length, 5, 'each misplaced section is reported', { problems: misplaced.problems })
  for (const value of ['PgPassw0rd', 'R3disPass', 'giteaPass1', 'auditKey2', 'adminTok3']) {
    t.notOk(misplaced.message.includes(value) || misplaced.details.includes(value), `misplaced value ${value.slice(0, 4)}… hidden`)
  }
  t.ok(misplaced.problems.every((p) => p.includes('<hidden>')))
  const notSecret = problemsOf({ file: yamlFile(t, { cache: 'big' }), env: {} })
  t.match(notSecret.message, /"big"/, 'a section without secrets still shows its value')

  // Valid secrets alongside another problem are not echoed either.
  const valid = problemsOf({
    env: { KEYGATE_ADMIN_TOKEN: 'a-valid-admin-token-1234', DATABASE_URL: 'postgres://u:validpass9@db/k', KEYGATE_ENCRYPTION_KEY: VALID_KEY, CACHE_TTL_SECONDS: 'x' },
  })
  t.equal(valid.problems.length, 1)
  for (const value of ['a-valid-admin-token-1234', 'validpass9', VALID_KEY]) t.notOk(valid.message.includes(value) || valid.details.includes(value))

  // An unquoted secret starting with * is read as an alias: not named (before: "Unresolved alias
  // (the anchor must be set before the alias): SecretTok1234567890", found by a review).
  const alias = yamlFile(t, 'admin:\n  token: *SecretTok1234567890\n', 'alias.yaml')
  const aliased = problemsOf({ file: alias, env: {} })
  t.same(aliased.problems, [`${alias}:2:10: a value starting with * is read as an alias of an anchor that is not there (the value is not shown); if it is a string (a password, a token), quote it`])
  t.notOk(aliased.message.includes('SecretTok1234567890') || aliased.details.includes('SecretTok1234567890'))
  // A key that is a mapping: not turned into text and quoted as an unknown key (found by a review).
  const keyed = yamlFile(t, '? {database: Sup3rS3cret}\n: x\n', 'keyed.yaml')
  const warnings: string[] = []
  const onWarning = (w: Error) => warnings.push(w.message)
  process.on('warning', onWarning)
  const keyedProblems = problemsOf({ file: keyed, env: {} })
  await new Promise((r) => setImmediate(r))
  process.off('warning', onWarning)
  t.same(keyedProblems.problems, [`${keyed}:1:3: a key that is a mapping or a list is not allowed (it is not shown)`])
  t.notOk(keyedProblems.message.includes('Sup3rS3cret') || keyedProblems.details.includes('Sup3rS3cret'))
  t.notOk(warnings.some((w) => w.includes('Sup3rS3cret')), 'nor in a process warning')

  // A YAML syntax error on a line holding a secret does not quote the line.
  const broken = problemsOf({ file: yamlFile(t, 'admin:\n  token: "syntaxsecret42\nstore: [\n'), env: {} })
  t.ok(broken.problems.length > 0)
  t.notOk(broken.message.includes('syntaxsecret42'))
  // Nor do the parser's messages that quote a value, a tag or a directive (before, found by a
  // review, the first three printed the password whole or in part).
  for (const [what, text, words] of [
    ['a block scalar header', 'integrations:\n  gitea:\n    password: |SECRETx7Kq9Zp3\n', /unexpected text here \(not shown\); if it is a string \(a password, a token\), quote it/],
    ['an escape', 'integrations:\n  n8n:\n    password: "pw\\USECRET123"\n', /an invalid \\ escape in a double-quoted string \(not shown\)/],
    ['a folded scalar header', 'admin:\n  token: >SECRETa SECRETbcdefghijk\n', /\(not shown\)/],
    ['a plain value start', 'admin:\n  token: @SECRETtoken1234567\n', /a plain value cannot start with this character \(not shown\)/],
  ] as const) {
    const p = problemsOf({ file: yamlFile(t, text, 'quoting.yaml'), env: {} })
    t.ok(p.problems.length > 0, `${what}: refused`)
    t.match(p.problems.join('\n'), words, `${what}: in keygate's words`)
    t.notOk(p.message.includes('SECRET') || p.details.includes('SECRET'), `${what}: nothing of the value shown`)
  }
})

t.test('an unknown key that runs a known key into its value (no space after the colon) does not show the value', async (t) => {
  // In a flow mapping `password:S3CR3Tpw` is one key: the message named it whole, and with it the
  // password, on stderr, in --json and in the journal through the unit's ExecStartPre check (found by a review).
  const secrets = ['S3CR3Tpw', 'PGsecret9', 'QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo', 'AdminTok3n', 'AdminTok4n', 'Rogue5ecret']
  const text = [
    'integrations:',
    '  gitea: { url: "http://127.0.0.1:3000", username: u, password:S3CR3Tpw }',
    '  n8n: { url: "http://127.0.0.1:5678", Rogue5ecret! }',
    'store: { database_url:postgres://u:PGsecret9@h/db }',
    'audit: { encryption_key:QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo= }',
    'admin: { token=AdminTok3n, listen: "127.0.0.1:8081" }',
    'redis: { url redis://:AdminTok4n@cache }',
    'cache: { ttl_s:60, my key: 1 }',
    '',
  ].join('\n')
  const file = yamlFile(t, text, 'leak.yaml')
  const found = problemsOf({ file, env: {} })
  for (const s of secrets) t.notOk(found.message.includes(s) || found.details.includes(s), `${s.slice(0, 4)}... not shown`)
  const gitea = 'url, username, password, timeout_ms'
  t.same(found.problems.map((p) => p.replace(/; allowed here: .*$/, '')).sort(), [
    'admin.token...: unknown key ("token=" is no YAML key; write "token: VALUE")',
    'audit.encryption_key...: unknown key (a space is missing after "encryption_key:"?)',
    'cache.my key: unknown key',
    'cache.ttl_s...: unknown key (a space is missing after "ttl_s:"?)',
    'integrations.gitea.password...: unknown key (a space is missing after "password:"?)',
    'integrations.n8n.<hidden>: unknown key (not shown: it is not a plain key name, and this section holds a secret)',
    'redis.url...: unknown key (a ":" is missing after "url"?)',
    'store.database_url...: unknown key (a space is missing after "database_url:"?)',
  ], 'named by the key it starts with, a section with a secret hides an odd key, a section without one shows it')
  t.ok(found.problems.some((p) => p.endsWith(`allowed here: ${gitea}`)), 'the allowed keys are still listed')
  for (const args of [['config', 'check', file], ['config', 'check', file, '--json']]) {
    const cli = await runCli(args)
    t.equal(cli.code, 1, `keygate ${args.slice(0, 2).join(' ')}${args.length > 3 ? ' --json' : ''} refuses the file`)
    t.match(cli.stdout + cli.stderr, /integrations\.gitea\.password\.\.\.: unknown key/)
    for (const s of secrets) t.notOk(cli.stdout.includes(s) || cli.stderr.includes(s), `${s.slice(0, 4)}... not printed`)
  }
})

t.test('YAML syntax errors and duplicate keys report file:line', async (t) => {
  const dup = yamlFile(t, 'gateway:\n  listen: "0.0.0.0:1"\n  listen: "0.0.0.0:2"\n', 'dup.yaml')
  t.same(problemsOf({ file: dup, env: {} }).problems, [`${dup}:3:3: Map keys must be unique`])
  const bad = yamlFile(t, 'cache:\n  ttl_s: 5\n  max_capacity: a: b\n', 'bad.yaml')
  t.same(problemsOf({ file: bad, env: {} }).problems, [`${bad}:3:17: Nested mappings are not allowed in compact mappings`])
  const worse = yamlFile(t, 'cache:\n  ttl_s: 5\n   max_capacity: [1, 2\nlog: "x\n', 'worse.yaml')
  const problems = problemsOf({ file: worse, env: {} }).problems
  t.ok(problems.length > 1, 'every syntax error is reported')
  for (const p of problems) t.match(p, new RegExp(`^${worse.replace(/[.]/g, '\\.')}:\\d+:\\d+: \\S`), 'file:line:column: message')

  t.same(problemsOf({ file: yamlFile(t, '- a\n- b\n'), env: {} }).problems.map((p) => p.replace(/^.*: /, '')), ['the top level must be a mapping of keys, not a list'])
  t.same(problemsOf({ file: '/nonexistent/keygate.yaml', env: {} }).problems, ['/nonexistent/keygate.yaml: cannot be read (ENOENT)'])
  t.same(
    unknownEnvNames({ KEYGATE_UPSTREM: 'http://x', KEYGATE_UPSTREAM: 'http://y', KEYGATE_CONFIG: 'k.yaml', KEYGATE_SOMETHING_ELSE: '1', PATH: '/bin', keygate_upstream: 'x' }),
    ['KEYGATE_SOMETHING_ELSE', 'KEYGATE_UPSTREM (KEYGATE_UPSTREAM?)'],
    'a misspelt KEYGATE_ variable is named, with the one meant; the known ones and others are not',
  )
  t.same(problemsOf({ file: 'nowhere/keygate.yaml', env: {} }).problems, [`nowhere/keygate.yaml: cannot be read (ENOENT; relative to ${process.cwd()})`], 'a relative path names the folder it was taken from')
  // In keygate's words; before: "Source contains multiple documents; please use YAML.parseAllDocuments()".
  const several = yamlFile(t, 'gateway: { listen: "0.0.0.0:1" }\n---\nadmin: { listen: "127.0.0.1:2" }\n', 'several.yaml')
  t.same(problemsOf({ file: several, env: {} }).problems, [`${several}:2:1: the file holds more than one YAML document (---); keygate reads one`])
})

t.test('an alias bomb and a __proto__ key are refused by name, not thrown or let through', async (t) => {
  const bomb = ['a: &a [x, x, x, x, x, x, x, x, x]']
  for (const n of 'bcdefgh') bomb.push(`${n}: &${n} [${Array(9).fill(`*${String.fromCharCode(n.charCodeAt(0) - 1)}`).join(', ')}]`)
  const bombFile = yamlFile(t, bomb.join('\n') + '\n', 'bomb.yaml')
  t.same(problemsOf({ file: bombFile, env: {} }).problems, [`${bombFile}: Excessive alias count indicates a resource exhaustion attack`])
  const proto = yamlFile(t, 'gateway:\n  __proto__: { foo: 1 }\n', 'proto.yaml')
  t.same(problemsOf({ file: proto, env: {} }).problems, [`${proto}: gateway: the key __proto__ is not allowed`], 'before, this file was valid: the key became a prototype')
  const top = yamlFile(t, '__proto__: { log: { level: debug } }\n', 'top.yaml')
  t.same(problemsOf({ file: top, env: {} }).problems, [`${top}: (top level): the key __proto__ is not allowed`])
})

t.test('an alias inside its own anchor (a cycle) is a problem at its line, not a stack overflow', async (t) => {
  // Before (found by a review): the document became a circular value, and walking it overflowed
  // the stack: `config check`, `serve` and every command said only "unexpected error: Maximum
  // call stack size exceeded" (internal_error), naming neither the file nor the line.
  const words = 'an alias inside the anchor it names (a cycle) is not allowed; a configuration value cannot contain itself'
  const list = yamlFile(t, 'gateway:\n  trusted_proxies: &p [10.0.0.0/8, *p]\n', 'list.yaml')
  t.same(problemsOf({ file: list, env: {} }).problems, [`${list}:2:36: ${words}`])
  const map = yamlFile(t, 'log: &l\n  level: info\n  again: *l\n', 'map.yaml')
  t.same(problemsOf({ file: map, env: {} }).problems, [`${map}:3:10: ${words}`])
  // An alias of an anchor elsewhere is no cycle, and stays allowed.
  const shared = yamlFile(t, 'gateway:\n  trusted_proxies: &p [10.0.0.0/8]\nwebhooks:\n  allow_private: *p\n', 'shared.yaml')
  t.same(loadConfig({ file: shared, env: {} }).webhooks.allow_private, ['10.0.0.0/8'])
  // The command: one problem, exit 1, no stack overflow.
  const r = await runCli(['config', 'check', list])
  t.equal(r.code, 1)
  t.equal(r.stderr, `keygate: invalid configuration:\n  ${list}:2:36: ${words}\n`)
})

t.test('a document nested too deeply for the parser is one problem at its place, in words', async (t) => {
  // Before (found by a review): the engine's "Maximum call stack size exceeded", and the same
  // overflow again as "Invalid regular expression: ... Stack overflow", each as a problem.
  const words = 'nests too deeply to be read (hundreds of levels); a configuration nests a few'
  for (const [name, doc] of [
    ['lists.yaml', `gateway: ${'['.repeat(3000)}${']'.repeat(3000)}\n`],
    ['maps.yaml', `gateway: ${'{a: '.repeat(3000)}1${'}'.repeat(3000)}\n`],
  ] as const) {
    const file = yamlFile(t, doc, name)
    const problems = problemsOf({ file, env: {} }).problems
    t.equal(problems.length, 1, `${name}: one problem`, { problems })
    t.match(problems[0], new RegExp(`^${file.replaceAll('.', '\\.')}:1:\\d+: ${words.replace(/[()]/g, '\\$&')}$`), name)
  }
})

t.test('a YAML value that is no scalar, list or mapping (!!binary, !!set, !!omap, !!timestamp) is one problem of the wrong type', async (t) => {
  const gatewayKeys = `a mapping with the keys ${Object.keys(ConfigSchema.properties.gateway.properties).join(', ')}`
  // Before: the Buffer was walked as a mapping with one unknown key per byte, gateway[0] to
  // gateway[999999] (9 s, 2 GB of memory and a line per byte for a 1.3 MB file; a file is now at most 1 MiB).
  const big = yamlFile(t, `gateway: !!binary ${Buffer.alloc(700_000, 7).toString('base64')}\n`, 'binary.yaml')
  const r = problemsOf({ file: big, env: {} })
  t.same(r.problems, [`gateway: binary data (700000 bytes) is not allowed; expected ${gatewayKeys}`])
  t.ok(r.message.length < 1000, 'the message stays short', { length: r.message.length })
  // Before: each of these was accepted, the section quietly replaced by its defaults.
  const one = (doc: string) => problemsOf({ file: yamlFile(t, doc), env: {} }).problems
  t.same(one('gateway: !!set {listen}\n'), [`gateway: a set (!!set) is not allowed; expected ${gatewayKeys}`])
  t.same(one('gateway: !!omap [listen: "0.0.0.0:1"]\n'), [`gateway: an ordered mapping (!!omap) is not allowed; expected ${gatewayKeys}`])
  t.same(one('gateway: !!timestamp 2001-12-14\n'), [`gateway: a timestamp (2001-12-14T00:00:00.000Z) is not allowed; expected ${gatewayKeys}`])
  // (A YAML 1.1 file makes a Date of an untagged date too; not shown here: tap's own YAML tags change that schema in this process.)
  t.same(one('log:\n  level: !!timestamp 2001-12-14\n'), ['log.level: a timestamp (2001-12-14T00:00:00.000Z) is not allowed; expected one of debug, info, warn, error'])
  t.same(one('admin:\n  token: !!binary aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=\n').map((p) => p.replace(/;.*$/, '')), ['admin.token: <hidden> is not allowed'])
  // Items of lists: one problem each, the other items still checked; before, a route was walked byte by byte too.
  t.same(one('routes:\n  - !!binary aGVsbG8=\n  - { name: a, path: /a }\n'), [
    `routes[0]: binary data (5 bytes) is not allowed; expected ${describeAllowed(ConfigSchema.properties.routes.items)}`,
    'routes[1].upstream: is required; expected an http:// or https:// URL without user:password@, a query or a fragment',
  ])
  t.same(one('gateway:\n  key_sources: [!!binary aGVsbG8=, !!binary aGk=]\n').map((p) => p.replace(/ is not allowed.*$/, '')), [
    'gateway.key_sources[0]: binary data (5 bytes)',
    'gateway.key_sources[1]: binary data (2 bytes)',
  ], 'not also a complaint about repeats')
  t.same(one('!!set {gateway}\n').map((p) => p.replace(/^.*: /, '')), ['the top level must be a mapping of keys, not a set (!!set)'])
  // An environment variable does not write into it either.
  const set = yamlFile(t, 'gateway: !!set {listen}\n')
  t.same(problemsOf({ file: set, env: { KEYGATE_LISTEN: '0.0.0.0:9' } }).problems, [`gateway: a set (!!set) is not allowed; expected ${gatewayKeys}`])
})

t.test('an environment variable whose bytes were not UTF-8 (Node reads each as U+FFFD) is refused, naming it', async (t) => {
  const file = yamlFile(t, '')
  t.same(problemsOf({ file, env: { KEYGATE_DATA_DIR: '/var/lib/caf\ufffd' } }).problems, ['KEYGATE_DATA_DIR (store.data_dir): the value holds bytes that are not UTF-8 (read as U+FFFD); give it in UTF-8'])
  const secret = problemsOf({ file, env: { KEYGATE_ADMIN_TOKEN: 'caf\ufffd-admin-token-0123456789' } })
  t.same(secret.problems, ['KEYGATE_ADMIN_TOKEN (admin.token): the value holds bytes that are not UTF-8 (read as U+FFFD); give it in UTF-8'], 'a secret too, without showing it')
  t.equal(loadConfig({ file, env: { KEYGATE_DATA_DIR: '/var/lib/café' } }).store.data_dir, '/var/lib/café', 'UTF-8 loads')
})

t.test('a file that is not UTF-8, or too large, is refused in keygate\'s words', async (t) => {
  const write = (bytes: Buffer, name: string) => {
    const file = join(tempDir(t), name)
    writeFileSync(file, bytes)
    return file
  }
  // Latin-1: before, read as U+FFFD and loaded without a word.
  const before = 'store:\n  data_dir: "/var/lib/caf'
  const latin1 = write(Buffer.concat([Buffer.from(before), Buffer.from([0xe9]), Buffer.from('"\n')]), 'latin1.yaml')
  t.same(problemsOf({ file: latin1, env: {} }).problems, [`${latin1}:2:26: the file is not UTF-8 text (an invalid byte at offset ${before.length}); save it as UTF-8`])
  // A U+FFFD the file holds is text: the offset is that of the byte after it, on its line.
  const replaced = write(Buffer.concat([Buffer.from('\ufefflog: { level: warn } # \ufffd\ufffd\n# caf'), Buffer.from([0xe9, 0x0a])]), 'replaced.yaml')
  t.same(problemsOf({ file: replaced, env: {} }).problems, [`${replaced}:2:6: the file is not UTF-8 text (an invalid byte at offset 38); save it as UTF-8`])
  const utf8 = write(Buffer.from(`\ufeff${before}é"\n`), 'utf8.yaml')
  t.equal(loadConfig({ file: utf8, env: {} }).store.data_dir, '/var/lib/café', 'UTF-8, with or without a byte order mark, loads')
  // UTF-16 (as Windows editors save it): before, "the top level must be a mapping of keys, not string".
  const text = '\ufeffgateway:\n  listen: "0.0.0.0:1"\n'
  const little = write(Buffer.from(text, 'utf16le'), 'utf16le.yaml')
  const big = write(Buffer.from(text, 'utf16le').swap16(), 'utf16be.yaml')
  for (const file of [little, big]) {
    t.same(problemsOf({ file, env: {} }).problems, [`${file}: the file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8`])
  }
  // Without a byte order mark (iconv -t UTF-16LE, .NET's UnicodeEncoding without a preamble): NUL
  // bytes are valid UTF-8, and before (found by a review) this was again "the top level must be a
  // mapping of keys, not string", where the README promises a UTF-16 file is refused as UTF-16.
  const bare = text.slice(1)
  const littleBare = write(Buffer.from(bare, 'utf16le'), 'utf16le-bare.yaml')
  const bigBare = write(Buffer.from(bare, 'utf16le').swap16(), 'utf16be-bare.yaml')
  for (const file of [littleBare, bigBare]) {
    t.same(problemsOf({ file, env: {} }).problems, [`${file}: the file is UTF-16 (a NUL byte beside its first character, as UTF-16 without a byte order mark has beside each ASCII one); save it as UTF-8`])
  }
  // Before: an 18 MB file took 13.6 s and 1.5 GB of memory to check.
  const padding = (size: number) => Buffer.concat([Buffer.from('log: { level: warn }\n'), Buffer.alloc(size - 22, '#'), Buffer.from('\n')])
  t.equal(loadConfig({ file: write(padding(MAX_CONFIG_BYTES), 'full.yaml'), env: {} }).log.level, 'warn', 'a file of 1 MiB loads')
  const large = write(padding(MAX_CONFIG_BYTES + 1), 'large.yaml')
  t.same(problemsOf({ file: large, env: {} }).problems, [`${large}: the file is larger than 1 MiB (1048577 bytes); a configuration file is at most 1 MiB`])
  // A device has no size to go by: it is read up to the bound.
  t.same(problemsOf({ file: '/dev/zero', env: {} }).problems, ['/dev/zero: the file is larger than 1 MiB; a configuration file is at most 1 MiB'])
})

t.test('at most 50 problems are listed, then how many more', async (t) => {
  const doc = `gateway:\n${Array.from({ length: 120 }, (_, i) => `  k${i}: 1\n`).join('')}`
  const { problems, message, code } = problemsOf({ file: yamlFile(t, doc), env: {} })
  t.equal(code, 'config_invalid')
  t.equal(problems.length, 51)
  t.match(problems.slice(0, 50), Array.from({ length: 50 }, (_, i) => new RegExp(`^gateway\\.k${i}: unknown key`)))
  t.equal(problems[50], 'and 70 more problems')
  t.ok(message.endsWith('\n  and 70 more problems'))
  const fifty = `gateway:\n${Array.from({ length: 50 }, (_, i) => `  k${i}: 1\n`).join('')}`
  t.equal(problemsOf({ file: yamlFile(t, fifty), env: {} }).problems.length, 50, 'exactly 50: no count line')
})

t.test('an environment variable under a mapping the file got wrong does not hide the mistake', async (t) => {
  const file = yamlFile(t, 'store: "/var/lib/keygate"\n')
  const { problems } = problemsOf({ file, env: { KEYGATE_DATA_DIR: '/srv/keygate' } })
  t.same(problems.map((p) => p.replace(/;.*$/, '')), ['store: <hidden> is not allowed'], 'before, KEYGATE_DATA_DIR replaced it and the file passed (hidden: the store section holds database_url)')
})

t.test('KEYGATE_UPSTREAM creates a route for /', async (t) => {
  const c = loadConfig({ env: { KEYGATE_UPSTREAM: 'http://127.0.0.1:3000' } })
  t.same(c.routes, [{ name: 'default', path: '/', upstream: 'http://127.0.0.1:3000', timeout_ms: 30_000, keepalive_timeout_ms: 4_000, scopes: [], strip_prefix: false, preserve_host: false, rewrite_redirects: true, cors_preflight: false }])

  const file = yamlFile(t, { routes: [{ name: 'api', path: '/api', upstream: 'http://127.0.0.1:4000' }] })
  const both = loadConfig({ file, env: { KEYGATE_UPSTREAM: 'http://127.0.0.1:3000' } })
  t.same(both.routes.map((r) => [r.name, r.path]), [['api', '/api'], ['default', '/']], 'added beside the configured routes')
  t.same(loadConfig({ file, env: {}, flags: { upstream: 'https://up.example' } }).routes[1]?.upstream, 'https://up.example', 'also as --upstream')

  const rootTaken = yamlFile(t, { routes: [{ name: 'root', path: '/', upstream: 'http://127.0.0.1:4000' }] })
  // Named by the variable or flag that set it, as every other value from one is (before: `upstream: ...`).
  onlyProblems(t, problemsOf({ file: rootTaken, env: { KEYGATE_UPSTREAM: 'http://127.0.0.1:3000' } }).problems, [/^KEYGATE_UPSTREAM \(upstream\): "http:\/\/127\.0\.0\.1:3000" is not allowed; expected no route for \/ in routes/])
  const byFlag = problemsOf({ file: rootTaken, env: {}, flags: { upstream: 'http://127.0.0.1:3000' } })
  t.equal(byFlag.code, 'usage_error')
  onlyProblems(t, byFlag.problems, [/^--upstream \(upstream\): .*no route for \/ in routes/])
  onlyProblems(t, problemsOf({ file: yamlFile(t, { upstream: 'http://127.0.0.1:3000', routes: [{ name: 'root', path: '/', upstream: 'http://127.0.0.1:4000' }] }), env: {} }).problems, [/^upstream: .*no route for \/ in routes/], 'from the file, by its key')
  const nameTaken = yamlFile(t, { routes: [{ name: 'default', path: '/x', upstream: 'http://127.0.0.1:4000' }] })
  onlyProblems(t, problemsOf({ file: nameTaken, env: { KEYGATE_UPSTREAM: 'http://127.0.0.1:3000' } }).problems, [/^KEYGATE_UPSTREAM \(upstream\): .*no route named "default"/])
  onlyProblems(t, problemsOf({ env: { KEYGATE_UPSTREAM: 'localhost:3000' } }).problems, [/^KEYGATE_UPSTREAM \(upstream\): "localhost:3000" is not allowed; expected an http/])
})

t.test('route names must be unique', async (t) => {
  const file = yamlFile(t, {
    routes: [
      { name: 'api', path: '/a', upstream: 'http://127.0.0.1:1' },
      { name: 'web', path: '/w', upstream: 'http://127.0.0.1:2' },
      { name: 'api', path: '/b', upstream: 'http://127.0.0.1:3' },
    ],
  })
  t.same(problemsOf({ file, env: {} }).problems, ['routes[2].name: "api" is not allowed; expected a name no other route uses'])
  const ok = loadConfig({ file: yamlFile(t, { routes: [{ name: 'api', path: '/a', upstream: 'http://127.0.0.1:1' }] }), env: {} })
  t.same(ok.routes[0], { name: 'api', path: '/a', upstream: 'http://127.0.0.1:1', timeout_ms: 30_000, keepalive_timeout_ms: 4_000, scopes: [], strip_prefix: false, preserve_host: false, rewrite_redirects: true, cors_preflight: false }, 'route defaults')
  // The metrics' label of requests that match no route (before, found by a review, such a
  // route's series and theirs were one).
  const none = yamlFile(t, { routes: [{ name: 'none', path: '/n', upstream: 'http://127.0.0.1:1' }] })
  t.same(problemsOf({ file: none, env: {} }).problems, ['routes[0].name: "none" is not allowed; expected another name ("none" is the metrics\' label of requests that match no route)'])
  t.equal(loadConfig({ file: yamlFile(t, { routes: [{ name: 'none-left', path: '/n', upstream: 'http://127.0.0.1:1' }] }), env: {} }).routes[0]?.name, 'none-left', 'a name that only starts so is a name')
})

t.test('two routes for one path prefix and host are refused, compared as the gateway compares them', async (t) => {
  const file = yamlFile(t, {
    routes: [
      { name: 'public', path: '/api', upstream: 'http://127.0.0.1:1' },
      { name: 'admin-only', path: '/api/', upstream: 'http://127.0.0.1:1', scopes: ['admin'] },
      { name: 'same', path: '/x', host: 'Example.com', upstream: 'http://127.0.0.1:2' },
      { name: 'same2', path: '/x', host: 'example.com', upstream: 'http://127.0.0.1:3' },
      { name: 'other-host', path: '/x', host: 'example.org', upstream: 'http://127.0.0.1:3' },
      { name: 'any-host', path: '/x', upstream: 'http://127.0.0.1:3' },
      { name: 'with-port', path: '/x', host: 'example.com:8443', upstream: 'http://127.0.0.1:3' },
      { name: 'longer', path: '/api/v2', upstream: 'http://127.0.0.1:3' },
    ],
  })
  t.same(
    problemsOf({ file, env: {} }).problems,
    [
      'routes[1].path: "/api/" is not allowed; expected a path and host no other route uses (routes[0] "public")',
      'routes[3].path: "/x" is not allowed; expected a path and host no other route uses (routes[2] "same")',
    ],
    'before, both passed and the first took every request: admin-only and its scope were never used',
  )
  // The upstream shortcut's route is / for any host: a route for // is one too.
  const slashes = yamlFile(t, { routes: [{ name: 'root', path: '//', upstream: 'http://127.0.0.1:4000' }] })
  onlyProblems(t, problemsOf({ file: slashes, env: { KEYGATE_UPSTREAM: 'http://127.0.0.1:3000' } }).problems, [/^KEYGATE_UPSTREAM \(upstream\): .*no route for \/ in routes/])
  const rootForHost = yamlFile(t, { routes: [{ name: 'root', path: '/', host: 'a.example', upstream: 'http://127.0.0.1:4000' }] })
  t.same(loadConfig({ file: rootForHost, env: { KEYGATE_UPSTREAM: 'http://127.0.0.1:3000' } }).routes.map((r) => r.name), ['root', 'default'], 'a route for / on one host leaves the shortcut for the others')
})

t.test('two routes for one host that differ only in letter case or %-escapes are refused, naming both; distinct routes still load', async (t) => {
  // Before (found by a review): /admin (scopes [admin]) and /ADMIN (none) passed; /ADMIN/users
  // matched the unscoped route and was forwarded unchecked to an upstream that read it as /admin.
  const lenient = 'is not allowed; expected a path that is not another route\'s for the same host as lenient upstreams read paths'
  const file = yamlFile(t, {
    routes: [
      { name: 'admin', path: '/admin', upstream: 'http://127.0.0.1:1', scopes: ['admin'] },
      { name: 'shouting', path: '/ADMIN', upstream: 'http://127.0.0.1:1' },
      { name: 'encoded', path: '/%61dmin/', upstream: 'http://127.0.0.1:1' },
      { name: 'other-host', path: '/Admin', host: 'a.example', upstream: 'http://127.0.0.1:2' },
      { name: 'same-host', path: '/%41DMIN', host: 'A.example.', upstream: 'http://127.0.0.1:2' },
    ],
  })
  const why = 'would be taken as one route by an upstream that ignores case or decodes %-escapes (or reads paths in one of the other ways)'
  t.same(problemsOf({ file, env: {} }).problems, [
    `routes[1].path: "/ADMIN" ${lenient} (letter case, %-escapes, ";" parameters, "//", "\\", trailing dots; a format suffix, to the same upstream): routes[1] "shouting" and routes[0] "admin" ("/admin") ${why}`,
    `routes[2].path: "/%61dmin/" ${lenient} (letter case, %-escapes, ";" parameters, "//", "\\", trailing dots; a format suffix, to the same upstream): routes[2] "encoded" and routes[0] "admin" ("/admin") ${why}`,
    `routes[4].path: "/%41DMIN" ${lenient} (letter case, %-escapes, ";" parameters, "//", "\\", trailing dots; a format suffix, to the same upstream): routes[4] "same-host" and routes[3] "other-host" ("/Admin") ${why}`,
  ])
  const check = yamlFile(t, { routes: [{ name: 'api', path: '/api', upstream: 'http://127.0.0.1:1' }, { name: 'API', path: '/API', upstream: 'http://127.0.0.1:1' }] })
  const cli = await runCli(['config', 'check', check])
  t.equal(cli.code, 1, 'config check refuses /api beside /API (before: valid)')
  t.match(cli.stderr, /routes\[1\]\.path: "\/API" is not allowed;.*routes\[1\] "API" and routes\[0\] "api" \("\/api"\) would be taken as one route/)
  const versions = yamlFile(t, { routes: [{ name: 'v2', path: '/api/v2', upstream: 'http://127.0.0.1:1', scopes: ['v2'] }, { name: 'v2-1', path: '/api/v2.1', upstream: 'http://127.0.0.1:1' }] })
  onlyProblems(t, problemsOf({ file: versions, env: {} }).problems, [/^routes\[1\]\.path: "\/api\/v2\.1" is not allowed; .*routes\[1\] "v2-1" and routes\[0\] "v2"/], 'a format suffix too, to one upstream: /api/v2.1 is /api/v2 to Rails')
  const ownUpstreams = yamlFile(t, { routes: [{ name: 'v2', path: '/api/v2', upstream: 'http://127.0.0.1:1', scopes: ['v2'] }, { name: 'v2-1', path: '/api/v2.1', upstream: 'http://127.0.0.1:2' }] })
  t.same(problemsOf({ file: ownUpstreams, env: {} }).problems, [], 'versions with a format-like suffix, each to its own upstream, load')
  // One server under two base paths, or a route that strips its prefix, is no upstream that sees
  // both paths as sent (before, found by a review, refused as one).
  for (const [what, second] of [['another base path', { upstream: 'http://127.0.0.1:1/b' }], ['a stripped prefix', { upstream: 'http://127.0.0.1:1', strip_prefix: true }]] as const) {
    const bases = yamlFile(t, { routes: [{ name: 'v2', path: '/api/v2', upstream: 'http://127.0.0.1:1/a', scopes: ['v2'] }, { name: 'v2-1', path: '/api/v2.1', ...second }] })
    t.same(problemsOf({ file: bases, env: {} }).problems, [], `versions on one server, with ${what}, load`)
  }
  // A deployment of distinct routes, nested, per host and with format-like segments, loads as before.
  const distinct = [
    { name: 'api', path: '/api', upstream: 'http://127.0.0.1:1' },
    { name: 'api-admin', path: '/api/admin', upstream: 'http://127.0.0.1:1', scopes: ['admin'] },
    { name: 'admin-host', path: '/api/admin', host: 'admin.example', upstream: 'http://127.0.0.1:2' },
    { name: 'root', path: '/', upstream: 'http://127.0.0.1:3' },
    { name: 'v2', path: '/api/v2', upstream: 'http://127.0.0.1:3' },
    { name: 'files', path: '/files%20old', upstream: 'http://127.0.0.1:3' },
  ]
  t.same(loadConfig({ file: yamlFile(t, { routes: distinct }), env: {} }).routes.map((r) => r.name), distinct.map((r) => r.name))
})

t.test('Router.exposures: a route with scopes whose upstream paths another route reaches without them (a stripped prefix, another base path on one server)', async (t) => {
  const route = (name: string, path: string, upstream: string, more: Record<string, unknown> = {}) => ({ name, path, upstream, timeout_ms: 1000, keepalive_timeout_ms: 4000, strip_prefix: false, preserve_host: false, rewrite_redirects: true, cors_preflight: false, scopes: [] as string[], ...more })
  const exposed = (...routes: ReturnType<typeof route>[]) => new Router(routes).exposures().map((e) => `${e.route} by ${e.by}: ${e.routePath} and ${e.byPath} are ${e.upstreamPath}`)
  const api = route('api', '/api', 'http://u:1', { strip_prefix: true, scopes: ['admin'] })
  t.same(exposed(api, route('web', '/', 'http://u:1')), ['api by web: /api/x and /x are /x'], 'a stripped prefix beside / on one upstream')
  t.same(exposed(api, route('web', '/web', 'http://u:1', { strip_prefix: true })), ['api by web: /api/x and /web/x are /x'], 'two stripped prefixes')
  t.same(exposed(route('api', '/api', 'http://u:1/internal', { scopes: ['admin'] }), route('web', '/', 'http://u:1')), ['api by web: /api/x and /internal/api/x are /internal/api/x'], 'another base path on one server')
  t.same(exposed(route('api', '/api', 'http://u:1', { scopes: ['admin'] }), route('web', '/', 'http://u:1')), [], 'nested routes sending paths as sent: /api/x is /api\'s own')
  t.same(exposed(route('api', '/api', 'http://u:1/api', { strip_prefix: true, scopes: ['admin'] }), route('web', '/', 'http://u:1')), [], 'a stripped prefix put back as the base path')
  t.same(exposed(api, route('web', '/', 'http://u:2')), [], 'another upstream')
  t.same(exposed(api, route('web', '/', 'http://u:1', { scopes: ['admin'] })), [], 'the same scopes')
  t.same(exposed(api, route('web', '/', 'http://u:1', { scopes: ['admin', 'web'] })), ['api by web: /api/x and /x are /x'], 'a scope more, which /api does not take')
  t.same(exposed(route('admin', '/admin', 'http://u:1/admin-svc', { strip_prefix: true, scopes: ['admin'] }), route('web', '/', 'http://u:1/frontend')), [], 'base paths apart')
  // Hosts: one upstream's virtual hosts, told apart by the Host a route sends on.
  const apiOfA = route('api', '/api', 'http://u:1', { host: 'a.example', strip_prefix: true, scopes: ['admin'], preserve_host: true })
  t.same(exposed(apiOfA, route('web', '/', 'http://u:1', { host: 'b.example', preserve_host: true })), [], 'another host, each sent on')
  t.same(exposed({ ...apiOfA, preserve_host: false }, route('web', '/', 'http://u:1', { host: 'b.example' })), ['api by web: /api/x and /x are /x'], 'another host, neither sent on: one Host upstream')
})

t.test('a route path with non-ASCII characters is the path clients send for it: UTF-8 percent-encoded, one route with its encoded spelling', async (t) => {
  const routes = (paths: string[]) => yamlFile(t, { routes: paths.map((path, i) => ({ name: `r${i}`, path, upstream: 'http://127.0.0.1:1' })) })
  t.same(problemsOf({ file: routes(['/données', '/donn%C3%A9es/']), env: {} }).problems, ['routes[1].path: "/donn%C3%A9es/" is not allowed; expected a path and host no other route uses (routes[0] "r0")'])
  t.same(problemsOf({ file: routes(['/données', '/donne\u0301es']), env: {} }).problems, ['routes[1].path: "/donne\u0301es" is not allowed; expected a path and host no other route uses (routes[0] "r0")'], 'in NFD (e and a combining accent) too')
  // Upper case and lower-case escapes are the same path to upstreams that ignore case or decode.
  // So are a compatibility form (fullwidth ｆ) and a letter that is ASCII in upper case (dotless ı).
  for (const [path, twin] of [['/données', '/DONNÉES'], ['/données', '/donn%c3%a9es'], ['/files', '/ｆiles'], ['/admin', '/adm%C4%B1n']]) {
    onlyProblems(t, problemsOf({ file: routes([path as string, twin as string]), env: {} }).problems, [/^routes\[1\]\.path: .* is not allowed; expected a path that is not another route's for the same host as lenient upstreams read paths/], `${twin} is ${path}`)
  }
  t.same(problemsOf({ file: routes(['/données', '/donnèes', '/naïve/path']), env: {} }).problems, [], 'other words load')
  t.same(problemsOf({ file: routes(['/x\ud800']), env: {} }).problems, ['routes[0].path: "/x\\ud800" is not allowed; expected a path starting with / without ?, #, control characters or dot segments'], 'a lone surrogate, which has no UTF-8 form')
})

t.test('a route path with a control character is refused: no request target holds one, and the route would never match', async (t) => {
  // Before (found by a review): `/a\u0001b` and `/a\u007fb` loaded, and the route was dead, as
  // Node's HTTP parser answers 400 to a target with a control character (a client sends `%01`).
  const withPath = (path: string) => yamlFile(t, { routes: [{ name: 'r', path, upstream: 'http://127.0.0.1:1' }] })
  for (const path of ['/a\u0001b', '/api\u0000', '/a\u007fb', '/a\u001b[31m']) {
    onlyProblems(t, problemsOf({ file: withPath(path), env: {} }).problems, [/^routes\[0\]\.path: ".*" is not allowed; expected a path starting with \/ without \?, #, control characters or dot segments$/], JSON.stringify(path))
  }
  t.same(problemsOf({ file: withPath('/a%01b'), env: {} }).problems, [], 'the escape a client sends for one loads')
  t.same(problemsOf({ file: withPath('/a\u0085b'), env: {} }).problems, [], 'a C1 character is not ASCII: percent-encoded as UTF-8, as clients send it')
})

t.test('a route\'s host is a host name or address with an optional port, as a request\'s Host is compared with it', async (t) => {
  // Before (found by a review): each passed (only minLength 1) and the route never matched.
  const words = 'expected a host name or IP address with an optional :port, such as api.example.com, api.example.com:8443, 192.0.2.7 or [2001:db8::7]:8443 (no scheme, path or wildcard)'
  const withHost = (host: string) => yamlFile(t, { routes: [{ name: 'h', path: '/api', host, upstream: 'http://127.0.0.1:1' }] })
  for (const host of ['*.example.com', 'https://example.com', '::1', '[::g]', 'exa mple.com ', 'example.com/api', 'example.com:', 'example.com:0', 'example.com:65536', 'example.com:08443', '-a.example', 'a..example', 'é.example']) {
    t.same(problemsOf({ file: withHost(host), env: {} }).problems, [`routes[0].host: ${JSON.stringify(host)} is not allowed; ${words}`], JSON.stringify(host))
  }
  for (const host of ['example.com', 'Example.COM', 'admin.local.', 'example.com:8443', '[::1]', '[2001:db8::7]:8443', '192.0.2.7:8080', 'under_score.internal', 'localhost']) {
    t.same(problemsOf({ file: withHost(host), env: {} }).problems, [], `${host} loads`)
  }
})

t.test('a route\'s scopes are scopes as keys hold them, and not a wildcard, which no route can need', async (t) => {
  // Before (found by a review): each passed, and no key could hold it (or, for orders:*, only a key
  // holding that very wildcard passed, not one with orders:read).
  const words = 'expected scope names as keys hold them, such as admin or orders:read (a lowercase letter or digit, then up to 63 of a-z 0-9 : . _ * -), and no wildcard such as orders:* (a key\'s orders:* grants every orders: scope; a route names the one it needs)'
  const withScopes = (scopes: string[]) => yamlFile(t, { routes: [{ name: 's', path: '/s', upstream: 'http://127.0.0.1:1', scopes }] })
  for (const scope of ['Orders:Read', 'orders read', '*', 'orders:*', ':read', 'a'.repeat(65), '']) {
    t.same(problemsOf({ file: withScopes(['ok', scope]), env: {} }).problems, [`routes[0].scopes[1]: ${JSON.stringify(scope)} is not allowed; ${words}`], JSON.stringify(scope))
  }
  t.same(problemsOf({ file: withScopes(['admin', 'orders:read', 'billing.v2', 'a*b', 'a'.repeat(64)]), env: {} }).problems, [], 'scopes keys can hold load')
})

t.test('gateway.listen and admin.listen on one address are refused where serve listens on both', async (t) => {
  const both = (gateway: string, admin: string, extra: Partial<LoadOptions> = {}) =>
    problemsOf({ file: yamlFile(t, { gateway: { listen: gateway }, admin: { listen: admin } }), env: {}, bothListeners: true, ...extra }).problems
  t.same(
    both('127.0.0.1:18398', '127.0.0.1:18398'),
    ['admin.listen: "127.0.0.1:18398" is not allowed; expected an address other than gateway.listen\'s ("127.0.0.1:18398"): serve listens on both (serve --only admin on admin.listen alone)'],
    'before, it passed and the start failed with "the address is in use", naming neither setting',
  )
  for (const [gateway, admin] of [['0.0.0.0:8080', '127.0.0.1:8080'], ['[::]:8080', '127.0.0.1:8080'], ['127.0.0.1:8080', '[::0]:8080'], ['[::ffff:127.0.0.1]:8080', '127.0.0.1:8080'], ['Localhost:8080', 'localhost:8080'], ['0.0.0.0:8080', 'localhost:8080']] as const) {
    t.equal(both(gateway, admin).length, 1, `${gateway} and ${admin} cannot both be bound`)
  }
  for (const [gateway, admin] of [['127.0.0.1:0', '127.0.0.1:0'], ['127.0.0.1:8080', '127.0.0.1:8081'], ['0.0.0.0:8080', '[::1]:8080'], ['127.0.0.1:8080', '[::1]:8080']] as const) {
    t.same(both(gateway, admin), [], `${gateway} and ${admin} can (port 0 is a free port each time)`)
  }
  t.same(both('127.0.0.1:8080', '127.0.0.1:8080', { bothListeners: false }), [], 'not where one listener is started (serve --only admin, a worker, the other commands)')
  t.same(
    problemsOf({ env: { KEYGATE_LISTEN: '0.0.0.0:9000' }, flags: { 'admin-listen': '127.0.0.1:9000' }, bothListeners: true }).problems,
    ['--admin-listen (admin.listen): "127.0.0.1:9000" is not allowed; expected an address other than gateway.listen\'s ("0.0.0.0:9000", from KEYGATE_LISTEN): serve listens on both (serve --only admin on admin.listen alone)'],
    'each named by where it was set',
  )
})

// Before (found by a docs walk): any text without a colon or bracket was a host, so `*:8080` (as
// Apache writes "every address"), `300.1.1.1:8080` or a host with a space passed `config check`,
// and serve then failed with "cannot listen on *:8080: getaddrinfo ENOTFOUND *", naming no setting.
t.test('a listen address whose host is neither an IP address nor a host name is refused', async (t) => {
  const allowed = 'expected host:port, such as 0.0.0.0:8080 or [::1]:8080'
  const listen = (gateway: string, admin = '127.0.0.1:8081') => problemsOf({ file: yamlFile(t, { gateway: { listen: gateway }, admin: { listen: admin } }), env: {} }).problems
  for (const bad of ['*:8080', '300.1.1.1:8080', '10.0.0.0.1:8080', '2130706433:8080', 'a b:8080', ' 127.0.0.1:8080', 'exa!mple.com:8080', '-host:8080', 'host-.example:8080', 'host..example:8080']) {
    t.same(listen(bad), [`gateway.listen: ${JSON.stringify(bad)} is not allowed; ${allowed}`], JSON.stringify(bad))
  }
  t.same(listen('0.0.0.0:8080', '*:8081'), [`admin.listen: "*:8081" is not allowed; ${allowed}`], 'admin.listen too')
  t.same(
    problemsOf({ env: { KEYGATE_LISTEN: '*:8080' }, flags: { 'admin-listen': '*:8081' } }).problems,
    [`KEYGATE_LISTEN (gateway.listen): "*:8080" is not allowed; ${allowed}`, `--admin-listen (admin.listen): "*:8081" is not allowed; ${allowed}`],
    'from the environment and a flag, every problem at once',
  )
  for (const good of ['0.0.0.0:8080', '127.0.0.1:0', '[::]:8080', '[::1]:8080', 'localhost:8080', 'Localhost.:8080', 'keygate-gw.internal.example:8080', 'gw_1:8080', '10.0.0.1:65535']) {
    t.same(listen(good), [], good)
  }
})

// Before (found by a docs walk): a host admin.allowed_hosts does not take was told by the pattern itself.
t.test('an admin.allowed_hosts entry that is no lower-case host name is refused in words', async (t) => {
  const hosts = (value: string[]) => problemsOf({ file: yamlFile(t, { admin: { allowed_hosts: value } }), env: {} }).problems
  t.same(hosts(['Bad_Host']), ['admin.allowed_hosts[0]: "Bad_Host" is not allowed; expected a string of at most 253 characters naming a host in lower case (letters, digits and -, in labels between dots, such as keygate.internal), or * for any'])
  t.same(hosts(['keygate-admin.orders.svc', '*']), [], 'names and * are taken')
})

// Before (found by a docs walk): `redis://cache:6379/abc` or `?db=abc` was taken as a Redis URL,
// and serve ended on its first Redis command with ioredis's stack trace ("ERR value is not an
// integer or out of range", SELECT NaN); `/5abc` quietly used database 5. Past 2147483647 (found
// by a config fuzzing review), Redis refuses SELECT ("ERR value is out of range"): serve started
// without Redis, only a warning saying so.
t.test('a Redis URL whose database is not a number Redis takes is refused', async (t) => {
  const allowed = 'expected a redis:// or rediss:// URL, its database, if any, a number up to 2147483647 (redis://host:6379/5)'
  const url = (value: string) => problemsOf({ env: { REDIS_URL: value } }).problems
  for (const bad of ['redis://cache:6379/abc', 'redis://cache:6379/5abc', 'redis://cache:6379/-1', 'redis://cache:6379/1/2', 'redis://cache:6379?db=abc', 'redis://cache:6379/?db=', 'rediss://:S3cret@cache/x', 'redis://cache:6379/2147483648', 'redis://cache:6379/99999999999', 'redis://cache?db=99999999999']) {
    t.same(url(bad), [`REDIS_URL (redis.url): <hidden> is not allowed; ${allowed}`], bad)
  }
  t.same(problemsOf({ file: yamlFile(t, { redis: { url: 'redis://cache/abc' } }), env: {} }).problems, [`redis.url: <hidden> is not allowed; ${allowed}`], 'in the file too')
  for (const good of ['redis://cache:6379', 'redis://cache:6379/', 'redis://cache:6379/5', 'rediss://:S3cret@cache/15', 'redis://cache?db=3', 'redis://[::1]:6379/0', 'redis://cache:6379/2147483647']) {
    t.same(url(good), [], good)
  }
})

// Before (found by a docs walk): keys.previous_prefixes holding keys.prefix itself loaded, so a
// move from kg_ to another prefix that listed kg_ but left keys.prefix as it was went on giving
// new keys kg_, which the reference says a previous prefix never is.
t.test('keys.previous_prefixes cannot hold keys.prefix', async (t) => {
  const keys = (doc: unknown, env: Record<string, string> = {}) => problemsOf({ file: yamlFile(t, { keys: doc }), env }).problems
  t.same(keys({ previous_prefixes: ['old_', 'kg_'] }), ['keys.previous_prefixes[1]: "kg_" is not allowed; expected a prefix other than keys.prefix ("kg_"): new keys are given keys.prefix, and a previous prefix never is'], 'the default prefix')
  t.same(keys({ prefix: 'acme_', previous_prefixes: ['acme_'] }), ['keys.previous_prefixes[0]: "acme_" is not allowed; expected a prefix other than keys.prefix ("acme_"): new keys are given keys.prefix, and a previous prefix never is'])
  t.same(keys({ prefix: 'acme_', previous_prefixes: ['kg_', 'old_'] }), [], 'others load')
  t.same(keys({ prefix: 'Acme', previous_prefixes: ['Acme'] }).length, 2, 'a prefix already wrong is reported once each, not compared')
})

// Before (found by a docs walk): retry_base_ms above retry_max_ms loaded, and every wait was
// retry_max_ms, the second attempt's too, which retry_base_ms is said to be.
t.test('webhooks.retry_base_ms cannot exceed webhooks.retry_max_ms', async (t) => {
  const webhooks = (doc: unknown) => problemsOf({ file: yamlFile(t, { webhooks: doc }), env: {} }).problems
  t.same(webhooks({ retry_base_ms: 5000, retry_max_ms: 100 }), ['webhooks.retry_base_ms: 5000 is not allowed; expected at most webhooks.retry_max_ms (100): every wait is at most that, the first too'])
  t.same(webhooks({ retry_max_ms: 1000 }), ['webhooks.retry_base_ms: 5000 is not allowed; expected at most webhooks.retry_max_ms (1000): every wait is at most that, the first too'], 'the default against a smaller maximum')
  t.same(webhooks({ retry_base_ms: 100, retry_max_ms: 100 }), [], 'equal: every wait the same')
  t.same(webhooks({ retry_base_ms: 0, retry_max_ms: 5 }).length, 2, 'values already wrong are reported once each, not compared')
})

t.test('.inf, -.inf and .nan are shown as the file has them', async (t) => {
  const file = yamlFile(t, 'cache: {ttl_s: .inf, max_capacity: .nan}\nlockout: {max_attempts: -.inf}\n')
  t.same(
    problemsOf({ file, env: {} }).problems.map((p) => p.replace(/; expected .*$/, '')),
    ['lockout.max_attempts: -.inf is not allowed', 'cache.ttl_s: .inf is not allowed', 'cache.max_capacity: .nan is not allowed'],
    'before, each was "null is not allowed"',
  )
})

t.test('KEYGATE_TRUSTED_PROXIES is a comma-separated list', async (t) => {
  const c = loadConfig({ env: { KEYGATE_TRUSTED_PROXIES: '10.0.0.0/8, 192.168.1.1 ,2001:db8::/32' } })
  t.same(c.gateway.trusted_proxies, ['10.0.0.0/8', '192.168.1.1', '2001:db8::/32'])
  const file = yamlFile(t, { gateway: { trusted_proxies: ['172.16.0.0/12'] } })
  t.same(loadConfig({ file, env: { KEYGATE_TRUSTED_PROXIES: '10.0.0.0/8' } }).gateway.trusted_proxies, ['10.0.0.0/8'], 'the variable replaces the file list')
  t.same(problemsOf({ env: { KEYGATE_TRUSTED_PROXIES: '10.0.0.0/8,not-a-cidr' } }).problems, [
    'KEYGATE_TRUSTED_PROXIES (gateway.trusted_proxies[1]): "not-a-cidr" is not allowed; expected an IPv4 or IPv6 address, or a CIDR range written as its network address, such as 10.0.0.0/8 or 2001:db8::/32',
  ])
})

t.test('a list variable of only spaces is unset, as an empty one is; one with an empty item is refused, naming the variable', async (t) => {
  const file = yamlFile(t, {
    gateway: { trusted_proxies: ['10.42.7.0/28'] },
    admin: { allowed_hosts: ['keygate-admin'] },
    audit: { previous_encryption_keys: [VALID_KEY] },
    webhooks: { allow_private: ['10.9.0.0/16'] },
  })
  const lists = {
    KEYGATE_TRUSTED_PROXIES: ['gateway.trusted_proxies', (c: Config) => c.gateway.trusted_proxies, ['10.42.7.0/28']],
    KEYGATE_ADMIN_ALLOWED_HOSTS: ['admin.allowed_hosts', (c: Config) => c.admin.allowed_hosts, ['keygate-admin']],
    KEYGATE_PREVIOUS_ENCRYPTION_KEYS: ['audit.previous_encryption_keys', (c: Config) => c.audit.previous_encryption_keys, [VALID_KEY]],
    KEYGATE_WEBHOOK_ALLOW_PRIVATE: ['webhooks.allow_private', (c: Config) => c.webhooks.allow_private, ['10.9.0.0/16']],
  } as const
  for (const [name, [key, read, fromFile]] of Object.entries(lists)) {
    // Before: " " and "\t" made the list [] without a word (older audit rows could no longer be decrypted).
    for (const blank of ['', ' ', ' \t ']) {
      t.same(read(loadConfig({ file, env: { [name]: blank } })), fromFile, `${name}=${JSON.stringify(blank)} leaves the file's list`)
    }
    for (const raw of [',', ' , ', 'a,,b', ',a', 'a,', 'a, ,b']) {
      const shown = name === 'KEYGATE_PREVIOUS_ENCRYPTION_KEYS' ? '<hidden>' : JSON.stringify(raw)
      t.same(problemsOf({ file, env: { [name]: raw } }).problems, [`${name} (${key}): ${shown} is not allowed; expected a comma-separated list without empty items`], `${name}=${JSON.stringify(raw)} is refused`)
    }
  }
})

t.test('TLS files must exist', async (t) => {
  const dir = tempDir(t)
  writeFileSync(join(dir, 'cert.pem'), 'x')
  const file = yamlFile(t, { gateway: { tls: { cert: join(dir, 'cert.pem'), key: join(dir, 'missing.pem') } } })
  t.same(problemsOf({ file, env: {} }).problems, [`gateway.tls.key: ${JSON.stringify(join(dir, 'missing.pem'))} is not allowed; expected a readable file (no such file)`])
})

t.test('TLS files must make a TLS context: a folder, not PEM, a key of another certificate', async (t) => {
  // Before: `config check` said valid, and serve ended with "unexpected error: EISDIR" or
  // "PEM routines::no start line", naming neither the setting nor the file.
  const dir = tempDir(t)
  const cert = join(dir, 'cert.pem')
  const key = join(dir, 'key.pem')
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=localhost'], { stdio: 'ignore' })
  const otherKey = join(dir, 'other-key.pem')
  writeFileSync(otherKey, generateKeyPairSync('ec', { namedCurve: 'prime256v1' }).privateKey.export({ type: 'pkcs8', format: 'pem' }))
  const notPem = join(dir, 'not-pem.txt')
  writeFileSync(notPem, 'hello\n')
  const at = (side: 'gateway' | 'admin', c: string, k: string) => problemsOf({ file: yamlFile(t, { [side]: { tls: { cert: c, key: k } } }), env: {} }).problems
  t.same(at('gateway', cert, key), [], 'a certificate and its key')
  t.same(at('gateway', dir, key), [`gateway.tls.cert: ${JSON.stringify(dir)} is not allowed; expected a readable file (it is a folder)`])
  t.same(at('admin', notPem, key), [`admin.tls.cert: ${JSON.stringify(notPem)} is not allowed; expected a PEM certificate`])
  t.same(at('gateway', cert, notPem), [`gateway.tls.key: ${JSON.stringify(notPem)} is not allowed; expected a PEM private key (not encrypted)`])
  const mismatched = at('gateway', cert, otherKey)
  t.equal(mismatched.length, 1, 'one problem')
  t.match(mismatched, [`gateway.tls.key: ${JSON.stringify(otherKey)} is not allowed; expected the private key of gateway.tls.cert (`])
})

t.test('an admin token with a space or a line break is refused, naming the variable, not shown', async (t) => {
  // Before (found by a review): accepted, though no client can present it (the credential ends
  // at the first space), and set, it stopped the first admin key from being made: every admin
  // call was 401. A Kubernetes secret made from a file that echo wrote ends in a line break.
  for (const token of ['a-long-enough-admin-token\n', 'a long enough admin token', '\ta-long-enough-admin-token']) {
    const { problems, message } = problemsOf({ env: { KEYGATE_ADMIN_TOKEN: token } })
    t.same(problems, ['KEYGATE_ADMIN_TOKEN (admin.token): <hidden> is not allowed; expected at least 16 visible ASCII characters, without spaces or line breaks (a file written by echo ends in one)'], JSON.stringify(token))
    t.notOk(message.includes('enough'), 'not shown')
  }
  t.same(problemsOf({ env: { KEYGATE_ADMIN_TOKEN: 'a-long-enough-admin-token' } }).problems, [], 'one without is taken')
  const key = problemsOf({ env: { KEYGATE_ENCRYPTION_KEY: `${VALID_KEY}\n` } }).problems
  onlyProblems(t, key, [/expected 32 bytes in base64 \(as `openssl rand -base64 32` prints\), without its line break$/], 'the encryption key says what to take away')
})

t.test('the names of environment variables', async (t) => {
  t.equal(new Set(ENV_NAMES).size, ENV_NAMES.length, 'each variable sets one leaf')
  for (const name of ['KEYGATE_UPSTREAM', 'KEYGATE_LISTEN', 'KEYGATE_ADMIN_LISTEN', 'KEYGATE_TRUSTED_PROXIES', 'DATABASE_URL', 'KEYGATE_DATA_DIR', 'REDIS_URL', 'CACHE_TTL_SECONDS', 'CACHE_MAX_CAPACITY', 'RATE_LIMIT_MAX_ATTEMPTS', 'RATE_LIMIT_WINDOW_SECONDS', 'GITEA_URL', 'N8N_URL', 'LOG_LEVEL', 'KEYGATE_ADMIN_TOKEN', 'KEYGATE_ENCRYPTION_KEY', 'GITEA_USERNAME', 'GITEA_PASSWORD', 'N8N_EMAIL', 'N8N_PASSWORD']) {
    t.ok(ENV_NAMES.includes(name), `${name} (SPEC) is read`)
  }
  for (const name of ['KEYGATE_ADMIN_TOKEN', 'DATABASE_URL', 'REDIS_URL', 'KEYGATE_ENCRYPTION_KEY', 'KEYGATE_PREVIOUS_ENCRYPTION_KEYS', 'GITEA_PASSWORD', 'N8N_PASSWORD']) {
    t.ok(LEAVES.find((l) => l.env === name)?.secret, `${name} is secret`)
  }
})

t.test('docs/configuration.md is generated from the schema', async (t) => {
  const docs = renderConfigDocs()
  const committed = readFileSync(new URL('../docs/configuration.md', import.meta.url), 'utf8')
  t.equal(committed, docs, 'regenerate docs/configuration.md from renderConfigDocs()')
  for (const leaf of LEAVES) t.ok(docs.includes(`| \`${dotted(leaf.path)}\` |`), `${dotted(leaf.path)} documented`)
  for (const name of ENV_NAMES) t.ok(docs.includes(`\`${name}\``), `${name} documented`)
})

t.test('the shipped deployment examples are valid configurations', async (t) => {
  const example = new URL('../deploy/keygate.example.yaml', import.meta.url).pathname
  const config = loadConfig({ file: example, env: {} })
  t.ok(config.routes.length > 0, 'deploy/keygate.example.yaml loads with its routes')
  // The Kubernetes example's environment, read from the manifest (its secrets stand in with valid values).
  const secrets: Record<string, string> = {
    DATABASE_URL: 'postgres://keygate@db:5432/keygate',
    REDIS_URL: 'redis://redis:6379',
    KEYGATE_ENCRYPTION_KEY: VALID_KEY,
    KEYGATE_ADMIN_TOKEN: 'a-long-bootstrap-token-0123456789',
  }
  type Probe = { httpGet: { path: string; port: string } }
  type Security = { runAsNonRoot?: boolean; runAsUser?: number; runAsGroup?: number; readOnlyRootFilesystem?: boolean; allowPrivilegeEscalation?: boolean; capabilities?: { drop?: string[] }; seccompProfile?: { type: string } }
  type Resources = { requests?: { cpu?: string; memory?: string }; limits?: { cpu?: string; memory?: string } }
  type Container = { name: string; env?: Array<{ name: string; value?: string }>; ports?: Array<{ name: string }>; readinessProbe?: Probe; livenessProbe?: Probe; startupProbe?: Probe; securityContext?: Security; resources?: Resources }
  const manifest = readFileSync(new URL('../deploy/kubernetes/sidecar.yaml', import.meta.url), 'utf8')
  const docs = parseAllDocuments(manifest).map((d) => d.toJS() as { kind: string })
  t.same(docs.map((d) => d.kind), ['Deployment', 'NetworkPolicy'])
  const k8s = docs[0] as unknown as { spec: { template: { spec: { containers: Container[]; securityContext?: Security } } } }
  const keygate = k8s.spec.template.spec.containers.find((c) => c.name === 'keygate') as Container
  const env = Object.fromEntries((keygate.env ?? []).map((e) => [e.name, e.value ?? secrets[e.name] ?? '']))
  for (const name of Object.keys(secrets)) t.ok(env[name], `the Kubernetes example sets ${name}`)
  const k8sConfig = loadConfig({ env })
  // The manifest's way to ask for scopes, a file of routes (KEYGATE_CONFIG), with its
  // KEYGATE_UPSTREAM kept: the shortcut's route for / without scopes joins the file's, and takes
  // every valid key on each path they leave out. Before (found by a review), the manifest named
  // the file and not that the variable must go with it.
  const withFile = loadConfig({ file: example, env })
  t.same(withFile.routes.filter((r) => r.scopes.length === 0).map((r) => [r.name, r.path]), [['default', '/']], 'KEYGATE_UPSTREAM adds a route without scopes to the file\'s')
  t.match(manifest, /name routes in a\s+# configuration file \(KEYGATE_CONFIG[^)]*\)\s+# and leave KEYGATE_UPSTREAM out/, 'the manifest says to leave KEYGATE_UPSTREAM out with such a file')
  t.equal(k8sConfig.admin.listen, '0.0.0.0:8081')
  // 0.0.0.0 is IPv4 alone: where pods have IPv6 addresses (single-stack IPv6, or dual-stack with
  // IPv6 first) the kubelet probes the pod's IPv6 address, refused, and no replica gets ready.
  // The manifest names the listen addresses for that, and they load (before, found by a review,
  // it said nothing of it).
  t.match(manifest, /KEYGATE_LISTEN=\[::\]:8080 and KEYGATE_ADMIN_LISTEN=\[::\]:8081/, 'the manifest names the addresses of an IPv6 cluster')
  t.match(loadConfig({ env: { ...env, KEYGATE_LISTEN: '[::]:8080', KEYGATE_ADMIN_LISTEN: '[::]:8081' } }), { gateway: { listen: '[::]:8080' }, admin: { listen: '[::]:8081' } })
  // Each form of the admin Service's name (before, found by a review: only one, and the others got 421).
  t.same(k8sConfig.admin.allowed_hosts, ['keygate-admin', 'keygate-admin.orders', 'keygate-admin.orders.svc', 'keygate-admin.orders.svc.cluster.local'])
  // Readiness is the gateway's /healthz, not the admin /readyz that follows the shared store
  // (before, found by a review: a PostgreSQL outage took every replica out at once), and a
  // start waiting on a migration has a startup probe's time before liveness counts. Liveness is
  // the admin /healthz, which the gateway's connection cap does not reach (before, found by a
  // review: the gateway's, so a flood of held connections restarted the container).
  const ports = (keygate.ports ?? []).map((p) => p.name)
  for (const [which, probe, port] of [['readiness', keygate.readinessProbe, 'gateway'], ['startup', keygate.startupProbe, 'gateway'], ['liveness', keygate.livenessProbe, 'admin']] as const) {
    t.same([probe?.httpGet.path, probe?.httpGet.port], ['/healthz', port], `the ${which} probe is the ${port} listener's /healthz`)
    t.ok(ports.includes(probe?.httpGet.port ?? ''), `the ${which} probe's port is declared`)
  }
  // Restricted Pod Security, as admission policies check it (before, found by a review: no
  // securityContext and no resources, so the example ran as the image's root and was refused).
  const pod = k8s.spec.template.spec.securityContext ?? {}
  t.match(pod, { runAsNonRoot: true, seccompProfile: { type: 'RuntimeDefault' } }, 'the pod runs as no root, with the runtime seccomp profile')
  t.ok(Number.isInteger(pod.runAsUser) && (pod.runAsUser as number) > 0 && Number.isInteger(pod.runAsGroup) && (pod.runAsGroup as number) > 0, 'as a numeric uid and gid other than root')
  for (const c of k8s.spec.template.spec.containers) {
    t.match(c.securityContext, { allowPrivilegeEscalation: false }, `${c.name}: no privilege escalation`)
    t.same(c.securityContext?.capabilities, { drop: ['ALL'] }, `${c.name}: no capabilities, none added back`)
  }
  t.equal(keygate.securityContext?.readOnlyRootFilesystem, true, 'keygate writes nothing with DATABASE_URL set: a read-only root')
  const mib = (q: string | undefined) => (q === undefined ? Number.NaN : Number(/^(\d+)Mi$/.exec(q)?.[1]))
  const [request, limit] = [mib(keygate.resources?.requests?.memory), mib(keygate.resources?.limits?.memory)]
  t.ok(request > 0 && limit >= request && keygate.resources?.requests?.cpu, 'keygate requests CPU and memory, and its memory is limited')
  // V8's heap is capped below the limit, leaving the rest of the process (about 150 MiB) room.
  const heap = Number(/--max-old-space-size=(\d+)/.exec(env.NODE_OPTIONS ?? '')?.[1])
  t.ok(heap > 0 && heap + 150 < limit, `the heap cap (${heap} MiB) leaves room under the memory limit (${limit} MiB)`)
  // The memory limiters' bound the limit is sized by is docs/gateway.md's (before, found by a
  // review: 50 MB each, what one held before it was bounded, where docs/gateway.md says 20).
  const limiterMb = /docs\/gateway\.md: about (\d+) MB each at most/.exec(manifest)?.[1]
  t.ok(limiterMb, 'the manifest cites the memory limiters\' bound')
  t.match(readFileSync(new URL('../docs/gateway.md', import.meta.url), 'utf8'), `holds at most 100,000 counts, about 200 bytes each, so at most about ${limiterMb} MB;`, 'as docs/gateway.md gives it')
  // The admin port, whose /metrics takes no credential, is open to named sources only; every
  // port of the pod is covered by a rule (a NetworkPolicy's ingress shuts any port it names in none).
  type Rule = { from?: unknown[]; ports?: Array<{ port: string }> }
  const policy = docs[1] as unknown as { spec: { podSelector: { matchLabels: Record<string, string> }; ingress: Rule[] } }
  t.same(policy.spec.podSelector.matchLabels, (k8s as unknown as { spec: { selector: { matchLabels: Record<string, string> } } }).spec.selector.matchLabels, 'the policy selects the Deployment\'s pods')
  const rules = (port: string) => policy.spec.ingress.filter((r) => (r.ports ?? []).some((p) => p.port === port))
  t.same(ports.toSorted(), ['admin', 'gateway'])
  t.ok(rules('admin').length > 0 && rules('admin').every((r) => (r.from ?? []).length > 0), 'the admin port only from the sources named')
  t.ok(rules('gateway').some((r) => r.from === undefined), 'the gateway port from anywhere')
  for (const d of parseAllDocuments(manifest)) t.same(d.errors, [], 'the manifest parses without errors')
  // The stop, within its budgets: keygate's drain, then the store's time and 2 s (README, Running),
  // after its preStop pause, inside the grace period; the guarded application stops only once
  // keygate has stopped forwarding to it.
  type Stopping = { name: string; lifecycle?: { preStop?: { sleep?: { seconds: number } } } }
  const podSpec = k8s.spec.template.spec as unknown as { terminationGracePeriodSeconds: number; containers: Stopping[] }
  const pause = (name: string) => podSpec.containers.find((c) => c.name === name)?.lifecycle?.preStop?.sleep?.seconds ?? Number.NaN
  const drain = k8sConfig.gateway.shutdown_timeout_ms / 1000
  const stop = drain + k8sConfig.store.query_timeout_ms / 1000 + 2
  t.ok(pause('keygate') + stop < podSpec.terminationGracePeriodSeconds, `keygate's pause and stop (${pause('keygate')} + ${stop} s) within the grace period`)
  const app = podSpec.containers.find((c) => c.name !== 'keygate')?.name ?? ''
  t.ok(pause(app) > pause('keygate') + drain, `the application's pause (${pause(app)} s) outlasts keygate's pause and drain`)
  // The systemd unit: its stop timeout holds the example's stop, and it checks the file serve reads.
  const unit = readFileSync(new URL('../deploy/systemd/keygate.service', import.meta.url), 'utf8')
  const setting = (name: string) => [...unit.matchAll(new RegExp(`^${name}=(.*)$`, 'gm'))].map((m) => m[1] as string)
  t.ok(Number(setting('TimeoutStopSec')[0]) > config.gateway.shutdown_timeout_ms / 1000 + config.store.query_timeout_ms / 1000 + 2, 'TimeoutStopSec holds the stop')
  const unitEnv = Object.fromEntries(setting('Environment').map((e) => e.split('=', 2) as [string, string]))
  t.match(setting('ExecStartPre')[0], new RegExp(` config check ${unitEnv.KEYGATE_CONFIG}$`), 'ExecStartPre checks the file KEYGATE_CONFIG names')
  t.equal(unitEnv.KEYGATE_DATA_DIR, `/var/lib/${setting('StateDirectory')[0]}`, 'the data folder is the StateDirectory, writable under ProtectSystem=strict')
  t.equal(unitEnv.NODE_COMPILE_CACHE, `/var/cache/${setting('CacheDirectory')[0]}`, 'the compile cache is the CacheDirectory, writable under ProtectSystem=strict')
})

t.test('the systemd unit\'s recipe for a command gives it the environment the service has', (t) => {
  // systemd reads EnvironmentFile= over Environment= (systemd.exec(5): "Settings from these files
  // override settings made with Environment="): a KEYGATE_CONFIG or KEYGATE_DATA_DIR in
  // keygate.env is what the service runs with. The recipe is run here as sh runs it, with a
  // keygate.env of its own, runuser left out and the command replaced by env. Before (found by a
  // review), it set the unit's values after reading keygate.env, so such a command read another
  // configuration, or another store, than the service's.
  const unit = readFileSync(new URL('../deploy/systemd/keygate.service', import.meta.url), 'utf8')
  const unitEnv = Object.fromEntries([...unit.matchAll(/^Environment=([^=\n]+)=(.*)$/gm)].map((m) => [m[1] as string, m[2] as string]))
  const recipe = /^#\s+sudo sh -c '([^']*runuser[^']*)'$/m.exec(unit)?.[1]
  t.ok(recipe, 'the unit gives a recipe run through sudo sh -c')
  if (recipe === undefined) return t.end()
  const dir = mkdtempSync(join(tmpdir(), 'keygate-unit-recipe-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const envFile = join(dir, 'keygate.env')
  // Single-quoted, as the unit asks: a $ and an & that sh would otherwise take as its own.
  writeFileSync(envFile, "DATABASE_URL='postgres://keygate:p$ss@db/keygate?sslmode=require&application_name=keygate'\nKEYGATE_CONFIG='/srv/keygate/other.yaml'\n")
  const script = recipe
    .replaceAll('/etc/keygate/keygate.env', envFile)
    .replace(/runuser -u keygate -- /, '')
    .replace(/\/usr\/bin\/node \/opt\/keygate\/bin\/keygate\.js .*$/, 'env')
  t.not(script, recipe, 'the recipe reads keygate.env')
  const out = execFileSync('sh', ['-c', script], { env: { PATH: process.env.PATH }, encoding: 'utf8' })
  const got = Object.fromEntries(out.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]))
  t.equal(got.DATABASE_URL, 'postgres://keygate:p$ss@db/keygate?sslmode=require&application_name=keygate', 'keygate.env\'s values as systemd reads them')
  t.equal(got.KEYGATE_CONFIG, '/srv/keygate/other.yaml', 'keygate.env\'s KEYGATE_CONFIG wins over the unit\'s, as in the service')
  t.ok(Object.keys(unitEnv).length >= 3, 'the unit sets its variables')
  for (const [name, value] of Object.entries(unitEnv)) if (name !== 'KEYGATE_CONFIG') t.equal(got[name], value, `the unit's ${name}`)
  // The files and folders the keygate user must reach, which nothing in the unit makes for it
  // (found by the same review): keygate.yaml, read by ExecStartPre and serve as that user, where
  // keygate.env is root's, read by systemd; and /var/lib/keygate before the service's first start,
  // for an import into a new embedded store (the user cannot make it: `permission denied`).
  t.match(unit, /keygate\.yaml holds no secret[^]*?readable to the keygate user/, 'the unit says keygate.yaml must be readable to the keygate user')
  t.match(unit, 'install -d -o keygate -g keygate -m 0700 /var/lib/keygate', 'and how to make the data folder before the first start')
  t.end()
})
