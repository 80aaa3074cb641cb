// A deny list entry that denies every client (`0.0.0.0/0`, `::/0`, an IPv6 range holding the
// IPv4-mapped block such as `::/64`) is taken, as nginx's `deny all` is, and said: by the admin
// API's answer (test/admin-gateway.test.ts), `keygate deny-list add` on stderr, `config check` and
// a `serve` start. Before (found by a review), each was taken without a word.
import t from 'tap'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { denyEntryWarnings, denyListWarnings } from '../core/deny-list.ts'
import { DenyMatcher } from '../gateway/deny-list.ts'
import { runCli, runCliHere } from './helpers/cli.ts'
import { postgresEnv, tempDir } from './helpers/cli-lifecycle.ts'
import { call, startUpstream } from './helpers/gateway.ts'
import { isolatedEnv, serve } from './helpers/serve.ts'

const ADMIN_TOKEN = 'an-admin-token-of-32-characters!'

t.test('the shared check says what an entry denies, as the gateway matches it', async (t) => {
  const every = ['::/0']
  // ::ffff:0:0 is 80 zero bits then ffff: every range whose first bits are those holds the block.
  const everyIpv4 = ['0.0.0.0/0', '::/1', '::/64', '::/80', '::fffe:0:0/95']
  const less = ['0.0.0.0/1', '10.0.0.0/8', '::/81', '::/96', '8000::/1', '2001:db8::/32', '::ffff:0:0/97', '192.0.2.7', '::1']
  for (const cidr of [...every, ...everyIpv4, ...less]) {
    const words = denyEntryWarnings(cidr)
    if (every.includes(cidr)) t.match(words, [ new RegExp(`^${cidr.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')} denies every client of the gateway, IPv4 and IPv6`)], cidr)
    else if (everyIpv4.includes(cidr)) t.match(words, [/denies every IPv4 client of the gateway/], cidr)
    else t.same(words, [], `${cidr}: no warning`)
    t.ok(words.length <= 1, `${cidr}: one warning at most`)
    // What the gateway's matcher does with the entry alone, for an IPv4 and an IPv6 client far from it.
    const m = new DenyMatcher([cidr])
    t.equal(m.denied('203.0.113.9', 0), words.length > 0, `${cidr}: an IPv4 client is denied exactly when warned of`)
    t.equal(m.denied('2001:db8:ffff::9', 0) && m.denied('fe80::1', 0), every.includes(cidr), `${cidr}: every IPv6 client only for every client`)
  }
  t.match(denyEntryWarnings('::/64'), [/it holds ::ffff:0:0\/96, the IPv4-mapped block/], 'why an IPv6 range denies IPv4 clients')
  t.match(denyEntryWarnings('0.0.0.0/0'), [/the admin listener does not check the deny list/], 'what stays open')
  // In the config file's words: the item named.
  t.same(denyListWarnings(['10.0.0.0/8', '::ffff:0:0/96', '::/0']).map((w) => w.replace(/ denies.*/, '')), ['deny_list[1]: ::ffff:0:0/96', 'deny_list[2]: ::/0'])
})

t.test('config check warns of a deny_list entry that denies every client', async (t) => {
  const dir = tempDir()
  const file = join(dir, 'keygate.yaml')
  writeFileSync(file, 'deny_list: ["10.0.0.0/8", "0.0.0.0/0", "::/0"]\n')
  const r = await runCliHere(['config', 'check', file])
  t.equal(r.code, 0, 'still valid: denying everyone may be meant')
  t.match(r.stdout, new RegExp(`^${file.replaceAll('.', '\\.')}: valid \\(0 routes\\)\nwarning: deny_list\\[1\\]: 0\\.0\\.0\\.0/0 denies every IPv4 client of the gateway.*\nwarning: deny_list\\[2\\]: ::/0 denies every client of the gateway.*\n$`))
  const json = await runCliHere(['config', 'check', file, '--json'])
  t.match(json.json().warnings, [/^deny_list\[1\]: 0\.0\.0\.0\/0 denies every IPv4 client/, /^deny_list\[2\]: ::\/0 denies every client/])
  t.equal(json.json().warnings.length, 2, 'the two warnings, as printed')
  writeFileSync(file, 'deny_list: ["10.0.0.0/8", "::/96"]\n')
  t.same((await runCliHere(['config', 'check', file, '--json'])).json().warnings, [], 'none for narrower ranges')
})

t.test('serve warns of such a deny_list entry at start; keygate deny-list add says so on stderr, through the admin API and on the store', async (t) => {
  const cwd = tempDir()
  writeFileSync(join(cwd, 'keygate.yaml'), 'deny_list: ["0.0.0.0/0"]\n')
  const [upstream, store] = await Promise.all([startUpstream(t), postgresEnv(t)])
  const served = await serve(t, { args: ['--upstream', upstream.url], env: isolatedEnv({ DATABASE_URL: store.url, KEYGATE_ENCRYPTION_KEY: store.env.KEYGATE_ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN }), cwd })
  await served.waitForLog((l) => /denies every/.test(l.message))
  const warned = () => served.logs.filter((l) => /^deny_list\[\d+\]: .* denies every/.test(l.message))
  t.match(warned(), [{ level: 'warn', message: /^deny_list\[0\]: 0\.0\.0\.0\/0 denies every IPv4 client of the gateway/ }], 'warned of at start')
  const refused = await call(`${served.gateway}/x`)
  t.equal(refused.status, 403, 'the gateway denies this IPv4 client')
  t.equal(refused.json.error.code, 'ip_blocked')
  t.equal((await call(`${served.gateway}/healthz`)).status, 200, "the gateway's /healthz still answers")
  t.equal((await call(`${served.admin}/v1/deny-list`, { token: ADMIN_TOKEN })).status, 200, 'the admin listener does not check the deny list, as the warning says')

  // Through the admin API, as the real process: the warning on stderr, one JSON document on stdout.
  const env = { ...store.env, KEYGATE_ADMIN_URL: served.admin, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN }
  const all = await runCli(['deny-list', 'add', '::/0', '--reason', 'close the gate', '--json'], { cwd, env })
  t.equal(all.code, 0, all.stderr)
  t.match(all.stderr, /^keygate: warning: ::\/0 denies every client of the gateway, IPv4 and IPv6.*\n$/)
  t.match(all.json(), { cidr: '::/0', reason: 'close the gate', updated: false, warnings: [/^::\/0 denies every client/] })
  t.equal(all.json().warnings.length, 1, 'the one warning, as on stderr')
  // On the store opened here, in a human line, and again as an update (the API's 200): said each time.
  const local = { ...store.env, KEYGATE_ADMIN_URL: undefined }
  const mapped = await runCliHere(['deny-list', 'add', '::/64'], { env: local })
  t.equal(mapped.code, 0, mapped.stderr)
  t.match(mapped.stderr, /^keygate: warning: ::\/64 denies every IPv4 client of the gateway: it holds ::ffff:0:0\/96/)
  t.match(mapped.stdout, /^Denied ::\/64 \(entry \w+\) with no expiry\.\n$/)
  const again = await runCliHere(['deny-list', 'add', '::/0', '--expires-in', '1h'], { env })
  t.match(again.stderr, /^keygate: warning: ::\/0 denies every client/, 'an update through the admin API too')
  const narrow = await runCliHere(['deny-list', 'add', '2001:db8::/32', '--json'], { env: local })
  t.equal(narrow.stderr, '', 'no warning for a narrower range')
  t.same(narrow.json().warnings, [])
  t.equal(await served.stop(), 0)
  // Counted once the process has ended and its log is read whole: t.match takes an array as the
  // items it starts with, and a second warning passed (found by a review).
  t.equal(warned().length, 1, 'warned of once, at start')
})
