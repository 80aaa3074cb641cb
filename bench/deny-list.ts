// node bench/deny-list.ts [--entries 20000] [--lookups 20000] [--rounds 7]
// The deny list's matcher (gateway/deny-list.ts) alone, in this process: lookups per second of
// new client addresses (each asked once, so neither the matcher's memo nor the parsed-address
// cache answers) against `entries` entries, as a ratio to the same lookups against an empty list.
// The lists: IPv4 /32s, IPv6 /64s (the two a review measured through the gateway), and a mix of
// both families and every length (the index's worst case: one probe per length present). Each
// round runs every list once, in turn, on its own fresh addresses (half IPv4, half IPv6, nearly
// all outside the lists: a miss looks at every length); the ratio is taken within the round and
// its median over the rounds printed with the middle half. Also the CPU time to load the entries
// into a new matcher (setStored: parsing and indexing), and that of a reload that reads the same
// entries again (new objects, as the store answers; every deny_list_refresh_s, 5 s by default),
// with its ratio to the load. Prints a markdown table.
// With DATABASE_URL, also the store's side of a reload, in a fresh database there holding `entries`
// rows: a full read (DenyListService.list(), what every reload did before migration 0014) and the
// read of the change mark alone (what a reload with nothing changed does now), this process's CPU
// and the wall time (PostgreSQL's work and the round trip) per read, and their ratios within each
// round. A second table.
import { DenyListService, type DenyEntry } from '../core/deny-list.ts'
import { openDb } from '../core/db.ts'
import { migrate } from '../core/migrate.ts'
import { DenyMatcher } from '../gateway/deny-list.ts'
import { freshDatabase } from '../test/helpers/stores.ts'
import { countArg as arg, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('entries', 'lookups', 'rounds')

const ENTRIES = arg('entries', 20_000)
const LOOKUPS = arg('lookups', 20_000)
const ROUNDS = arg('rounds', 7)

const hex = (n: number) => n.toString(16)
const rnd = (below: number) => Math.floor(Math.random() * below)
const entry = (i: number, cidr: string): DenyEntry => ({ id: `e${i}`, cidr, reason: null, createdBy: 'bench', createdAt: new Date(), expiresAt: null })

const lists: Record<string, () => DenyEntry[]> = {
  empty: () => [],
  'IPv4 /32': () => Array.from({ length: ENTRIES }, (_, i) => entry(i, `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`)),
  'IPv6 /64': () => Array.from({ length: ENTRIES }, (_, i) => entry(i, `2001:db8:${hex(i >> 16)}:${hex(i & 0xffff)}::/64`)),
  'both families, every length': () =>
    Array.from({ length: ENTRIES }, (_, i) =>
      i % 2 === 0 ? entry(i, `10.${rnd(256)}.${rnd(256)}.${rnd(256)}/${8 + (i % 25)}`) : entry(i, `2001:db8:${hex(rnd(65536))}:${hex(rnd(65536))}::/${32 + (i % 97)}`),
    ),
}

/** New addresses, never asked before in this process: 11.x.y.z and 2001:db9:… are on no list. */
let fresh = 0
function addresses(): string[] {
  const out: string[] = []
  for (let i = 0; i < LOOKUPS; i++, fresh++) out.push(i % 2 === 0 ? `11.${(fresh >> 16) & 255}.${(fresh >> 8) & 255}.${fresh & 255}` : `2001:db9:${hex(fresh >> 16)}:${hex(fresh & 0xffff)}::1`)
  return out
}

const names = Object.keys(lists)
const matchers = new Map<string, DenyMatcher>()
const loadMs = new Map<string, number[]>(names.map((n) => [n, []]))
const reloadMs = new Map<string, number[]>(names.map((n) => [n, []]))
const cpuMs = (since: NodeJS.CpuUsage) => {
  const used = process.cpuUsage(since)
  return (used.user + used.system) / 1000
}
/** The same entries read again: new objects, as each read of the store gives. */
const reread = (entries: DenyEntry[]): DenyEntry[] => entries.map((e) => ({ ...e, createdAt: new Date(e.createdAt), expiresAt: e.expiresAt && new Date(e.expiresAt) }))
for (const name of names) {
  const entries = (lists[name] as () => DenyEntry[])()
  let m = new DenyMatcher([])
  for (let i = 0; i < 3; i++) {
    m = new DenyMatcher([])
    const start = process.cpuUsage()
    m.setStored(entries, Date.now())
    ;(loadMs.get(name) as number[]).push(cpuMs(start))
  }
  for (let i = 0; i < 5; i++) {
    const read = reread(entries)
    const start = process.cpuUsage()
    if (m.setStored(read, Date.now())) throw new Error('a reload of the same entries rebuilt the matcher')
    ;(reloadMs.get(name) as number[]).push(cpuMs(start))
  }
  matchers.set(name, m)
}

// A warm-up round, not counted.
for (const name of names) for (const a of addresses()) (matchers.get(name) as DenyMatcher).denied(a, Date.now())

const rates = new Map<string, number[]>(names.map((n) => [n, []]))
const ratios = new Map<string, number[]>(names.map((n) => [n, []]))
let denied = 0
for (let r = 0; r < ROUNDS; r++) {
  const order = r % 2 === 0 ? names : [...names].reverse()
  const round = new Map<string, number>()
  for (const name of order) {
    const m = matchers.get(name) as DenyMatcher
    const asked = addresses()
    const now = Date.now()
    const start = process.hrtime.bigint()
    for (const a of asked) if (m.denied(a, now)) denied++
    round.set(name, LOOKUPS / (Number(process.hrtime.bigint() - start) / 1e9))
  }
  for (const name of names) {
    ;(rates.get(name) as number[]).push(round.get(name) as number)
    ;(ratios.get(name) as number[]).push((round.get(name) as number) / (round.get('empty') as number))
  }
}
if (denied !== 0) throw new Error(`${denied} of the fresh addresses were denied: the lists are not what this benchmark says`)

const quartile = (xs: number[], q: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))] as number
console.log(`${ENTRIES} entries, ${LOOKUPS} lookups of new addresses per list and round, ${ROUNDS} rounds, Node ${process.version}`)
console.log('')
console.log('| list | lookups/s | vs empty list (middle half) | load, CPU ms | reload unchanged, CPU ms | reload vs load |')
console.log('| --- | --- | --- | --- | --- | --- |')
for (const name of names) {
  const rs = ratios.get(name) as number[]
  const spread = name === 'empty' ? '1.00' : `${median(rs).toFixed(2)} (${quartile(rs, 0.25).toFixed(2)} to ${quartile(rs, 0.75).toFixed(2)})`
  console.log(`| ${name === 'empty' ? name : `${ENTRIES} × ${name}`} | ${Math.round(median(rates.get(name) as number[]))} | ${spread} | ${median(loadMs.get(name) as number[]).toFixed(1)} | ${median(reloadMs.get(name) as number[]).toFixed(1)} | ${name === 'empty' ? '' : (median(reloadMs.get(name) as number[]) / median(loadMs.get(name) as number[])).toFixed(3)} |`)
}

if (process.env.DATABASE_URL) {
  const teardowns: Array<() => unknown> = []
  try {
    const db = await openDb({ databaseUrl: await freshDatabase({ teardown: (fn) => void teardowns.push(fn) }), poolMax: 2 })
    teardowns.push(() => db.close())
    await migrate(db)
    await db.query(
      `INSERT INTO deny_list (id, cidr, created_by) SELECT 'e' || g, '10.' || (g >> 16) % 256 || '.' || (g >> 8) % 256 || '.' || g % 256, 'bench' FROM generate_series(0, $1::int - 1) g`,
      [ENTRIES],
    )
    await db.query('VACUUM ANALYZE deny_list')
    const service = new DenyListService({ db })
    const READS = 3
    /** CPU and wall ms per read of `read`, over READS reads. */
    const time = async (read: () => Promise<unknown>): Promise<{ cpu: number; wall: number }> => {
      const cpu = process.cpuUsage()
      const start = process.hrtime.bigint()
      for (let i = 0; i < READS; i++) await read()
      return { cpu: cpuMs(cpu) / READS, wall: Number(process.hrtime.bigint() - start) / 1e6 / READS }
    }
    const full = { cpu: [] as number[], wall: [] as number[] }
    const mark = { cpu: [] as number[], wall: [] as number[] }
    const vs = { cpu: [] as number[], wall: [] as number[] }
    if ((await service.list()).length !== ENTRIES || (await service.changeMark()) === undefined) throw new Error('the store does not hold what this benchmark says')
    for (let r = 0; r < ROUNDS; r++) {
      const f = await time(() => service.list())
      const m = await time(() => service.changeMark())
      for (const k of ['cpu', 'wall'] as const) {
        full[k].push(f[k])
        mark[k].push(m[k])
        vs[k].push(m[k] / f[k])
      }
    }
    console.log('')
    console.log(`The store's side of a reload: ${ENTRIES} rows in PostgreSQL (DATABASE_URL), ${READS} reads of each kind per round, ${ROUNDS} rounds`)
    console.log('')
    console.log('| read | CPU ms here | wall ms | vs full read: CPU (middle half) | vs full read: wall (middle half) |')
    console.log('| --- | --- | --- | --- | --- |')
    const spread = (xs: number[]) => `${median(xs).toFixed(4)} (${quartile(xs, 0.25).toFixed(4)} to ${quartile(xs, 0.75).toFixed(4)})`
    console.log(`| every row (a reload before 0014, or after a change) | ${median(full.cpu).toFixed(1)} | ${median(full.wall).toFixed(1)} | 1 | 1 |`)
    console.log(`| the change mark (a reload with nothing changed) | ${median(mark.cpu).toFixed(2)} | ${median(mark.wall).toFixed(2)} | ${spread(vs.cpu)} | ${spread(vs.wall)} |`)
  } finally {
    for (const fn of teardowns.reverse()) await fn()
  }
}
process.exit(0)
