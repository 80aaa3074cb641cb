// node bench/scheduler.ts [--keys 10000] [--rounds 3]
// What a scheduler round costs when `keys` keys are due for notice (their expiry two days off,
// inside the three-day notice period), on the embedded store and, with DATABASE_URL, on
// PostgreSQL: per round, two fresh stores holding the same kind of keys, one webhook registered
// for key.expiring. The baseline is the round without an event bus (its own work: locking the
// keys, recording the notices, their audit rows); then the round as `keygate serve` runs it, its
// key.expiring events staged for the webhook in the same transactions. Prints the medians of the
// rounds' wall times and the second as a ratio of the first in the same round.
import { createHash, randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { loadConfig } from '../config/load.ts'
import { EventBus } from '../core/events.ts'
import { silentLogger } from '../core/log.ts'
import { openRuntime } from '../core/runtime.ts'
import { Scheduler } from '../core/scheduler.ts'
import { WebhookService } from '../core/webhooks.ts'
import { countArg as arg, freshStores, median, type FreshStore, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('keys', 'rounds')

const KEYS = arg('keys', 10_000)
const ROUNDS = arg('rounds', 3)
const DAY = 86_400_000
const dir = mkdtempSync(join(tmpdir(), 'keygate-bench-scheduler-'))
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))

const stores = freshStores(dir)

/** One round on a fresh store of KEYS keys due for notice; its wall time in seconds. */
async function round(store: FreshStore, withEvents: boolean): Promise<number> {
  const { env, drop } = await store.open()
  try {
    const config = loadConfig({ env: { ...env, KEYGATE_WEBHOOK_ALLOW_PRIVATE: '127.0.0.1/32' } })
    const rt = await openRuntime(config, silentLogger)
    try {
      const expires = new Date(Date.now() + 2 * DAY).toISOString()
      for (let done = 0; done < KEYS; done += 10_000) {
        const rows = Array.from({ length: Math.min(10_000, KEYS - done) }, (_, i) => ({ key_hash: createHash('sha256').update(randomUUID()).digest('hex'), name: `notice ${done + i}`, expires_at: expires }))
        await rt.keys.importLegacy(rows, { actor: 'bench' })
      }
      const events = new EventBus()
      const webhooks = new WebhookService({ db: rt.db, cipher: rt.cipher, config: config.webhooks, log: silentLogger, deliver: false })
      try {
        webhooks.bind(events)
        await webhooks.create({ url: 'http://127.0.0.1:9/expiring', events: ['key.expiring'] }, { actor: 'bench' })
        const scheduler = new Scheduler({ db: rt.db, keys: rt.keys, audit: rt.audit, ...(withEvents ? { events } : {}), log: silentLogger, intervalS: 60, noticeMs: 3 * DAY, pruneRules: [] })
        const start = performance.now()
        const run = await scheduler.runOnce()
        const s = (performance.now() - start) / 1000
        if (run?.announced.length !== KEYS) throw new Error(`the round announced ${run?.announced.length} keys, not ${KEYS}`)
        // A round whose staging wrote nothing would measure well: its deliveries are counted.
        const [queued] = await rt.db.query<{ n: number }>(`SELECT count(*)::int AS n FROM webhook_deliveries WHERE event_type = 'key.expiring'`)
        if (queued?.n !== (withEvents ? KEYS : 0)) throw new Error(`the round queued ${queued?.n} deliveries, not ${withEvents ? KEYS : 0}`)
        return s
      } finally {
        await webhooks.close()
      }
    } finally {
      await rt.close()
    }
  } finally {
    await drop()
  }
}

const results = new Map<string, { without: number[]; with: number[] }>()
for (let r = 1; r <= ROUNDS; r++) {
  for (const store of stores) {
    const without = await round(store, false)
    const withEvents = await round(store, true)
    const times = results.get(store.name) ?? { without: [], with: [] }
    times.without.push(without)
    times.with.push(withEvents)
    results.set(store.name, times)
    process.stdout.write(`round ${r}, ${store.name}: without events ${without.toFixed(2)} s, with ${withEvents.toFixed(2)} s\n`)
  }
}
process.stdout.write(`\n${KEYS} keys due for notice, ${ROUNDS} rounds; medians\n\n| store | round without events, s | with key.expiring staged, s | with / without |\n| --- | --- | --- | --- |\n`)
for (const [name, t] of results) {
  process.stdout.write(`| ${name} | ${median(t.without).toFixed(2)} | ${median(t.with).toFixed(2)} | ${median(t.with.map((w, i) => w / (t.without[i] as number))).toFixed(2)} |\n`)
}
