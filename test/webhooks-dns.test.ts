// Webhook delivery to a name with several addresses: every address is checked against the
// allow-list, and the connection tries them in turn (Node's autoSelectFamily), as any client
// would. Before (found by a review), only the first answer was used: a receiver whose name
// resolves to an IPv6 address first, on a host without IPv6 or a receiver listening on IPv4
// only, was never reached. The name's answers come from dns.lookup replaced for one name (a
// resolver serving it cannot run here); everything else is real.
import t from 'tap'
import dns from 'node:dns'
import { syncBuiltinESMExports } from 'node:module'
import { AuditCipher } from '../core/audit.ts'
import { silentLogger } from '../core/log.ts'
import { WebhookService } from '../core/webhooks.ts'
import { startReceiver } from './helpers/webhooks.ts'
import { DEFAULT_CONFIG, TEST_ENCRYPTION_KEY, memoryDb } from './helpers/stores.ts'
import { migrate } from '../core/migrate.ts'

const NAME = 'dual-stack.keygate.test'
const REFUSED = 'half-private.keygate.test'
const original = dns.lookup
const ANSWERS: Record<string, Array<{ address: string; family: number }>> = {
  [NAME]: [
    { address: '::1', family: 6 },
    { address: '127.0.0.1', family: 4 },
  ],
  [REFUSED]: [
    { address: '127.0.0.1', family: 4 },
    { address: '10.1.2.3', family: 4 },
  ],
}
;(dns as { lookup: unknown }).lookup = (host: string, options: unknown, cb?: unknown) => {
  const callback = (typeof options === 'function' ? options : cb) as (err: Error | null, a: unknown, f?: number) => void
  const opts = (typeof options === 'object' && options !== null ? options : {}) as { all?: boolean }
  const answers = ANSWERS[host]
  if (!answers) return (original as (...a: unknown[]) => void)(host, options, cb)
  process.nextTick(() => (opts.all ? callback(null, answers) : callback(null, answers[0]?.address, answers[0]?.family)))
}
syncBuiltinESMExports()
t.teardown(() => {
  ;(dns as { lookup: unknown }).lookup = original
  syncBuiltinESMExports()
})

const db = await memoryDb({ migrated: true })
t.teardown(() => db.close())
await migrate(db)

t.test('a name answering an IPv6 address first, with nothing listening there: delivered over IPv4', async (t) => {
  const receiver = await startReceiver(t) // 127.0.0.1 only
  const s = new WebhookService({ db, cipher: new AuditCipher(TEST_ENCRYPTION_KEY), config: { ...DEFAULT_CONFIG.webhooks, allow_private: ['127.0.0.1/32', '::1/128'], timeout_ms: 5000 }, log: silentLogger, deliver: false })
  t.teardown(() => s.close())
  const { webhook } = await s.create({ url: `http://${NAME}:${receiver.port}/dual`, events: ['key.created'] }, { actor: 'test' })
  const delivery = await s.testFire(webhook.id, { actor: 'test' })
  t.equal(delivery.status, 'delivered', `delivered (${delivery.lastError ?? 'no error'})`)
  t.equal(receiver.received.length, 1, 'the receiver got it')

  // Every answer is still checked at delivery: one outside the allow-list refuses it (the URL is
  // registered while the name answers only the allowed address).
  ANSWERS[REFUSED] = [{ address: '127.0.0.1', family: 4 }]
  const { webhook: other } = await s.create({ url: `http://${REFUSED}:${receiver.port}/half`, events: ['key.created'] }, { actor: 'test' })
  ANSWERS[REFUSED] = [
    { address: '127.0.0.1', family: 4 },
    { address: '10.1.2.3', family: 4 },
  ]
  const refused = await s.testFire(other.id, { actor: 'test' })
  t.not(refused.status, 'delivered', 'not delivered when one of the answers is refused')
  t.match(refused.lastError, /resolves to/)
  t.equal(receiver.received.length, 1, 'nothing more reached the receiver')
})
