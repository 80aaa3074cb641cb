// An attempt whose outcome the store could not record (its UPDATE timed out behind a lock) was
// still made: keygate_webhook_attempts_total counts it (the onAttempt callback), and the delivery
// is retried when its lease ends. Before (found by a review), the attempt went uncounted, so the
// metric said fewer attempts than receivers had been sent.
import t from 'tap'
import pg from 'pg'
import { AuditCipher } from '../core/audit.ts'
import { openDb } from '../core/db.ts'
import { EventBus, type KeygateEvent } from '../core/events.ts'
import { silentLogger } from '../core/log.ts'
import { WebhookService } from '../core/webhooks.ts'
import { DEFAULT_CONFIG, TEST_ENCRYPTION_KEY, migratedDatabase } from './helpers/stores.ts'
import { startReceiver } from './helpers/webhooks.ts'

t.test('an attempt made whose outcome could not be recorded is counted', async (t) => {
  const { url } = await migratedDatabase(t)
  const db = await openDb({ databaseUrl: url, queryTimeoutMs: 300 })
  t.teardown(() => db.close())
  const locker = new pg.Client({ connectionString: url })
  await locker.connect()
  t.teardown(() => locker.end())
  const counted: Array<[string, boolean]> = []
  const config = { ...DEFAULT_CONFIG.webhooks, allow_private: ['127.0.0.1/32'] }
  const s = new WebhookService({ db, cipher: new AuditCipher(TEST_ENCRYPTION_KEY), config, log: silentLogger, onAttempt: (outcome, ended) => counted.push([outcome, ended]) })
  t.teardown(() => s.close())
  let received = 0
  // As the receiver answers, another session holds the delivery log: the outcome's UPDATE waits
  // past store.query_timeout_ms and fails.
  const receiver = await startReceiver(t, async (_hook, res) => {
    received++
    await locker.query('BEGIN')
    await locker.query('LOCK TABLE webhook_deliveries IN ACCESS EXCLUSIVE MODE')
    res.writeHead(204).end()
  })
  await s.create({ url: `${receiver.url}/hook`, events: ['key.revoked'] }, { actor: 'test' })
  const bus = new EventBus()
  let captured: KeygateEvent | undefined
  const off = bus.on((e) => (captured = e))
  bus.emit('key.revoked', { key: { id: 'k1' } })
  off()
  await s.enqueue(captured as KeygateEvent)
  s.kick()
  await s.idle()
  await locker.query('ROLLBACK')
  t.equal(received, 1, 'the receiver was sent the delivery')
  const [row] = await db.query<{ status: string }>('SELECT status FROM webhook_deliveries')
  t.equal(row?.status, 'pending', 'its outcome was not recorded: still pending, retried when its lease ends')
  t.same(counted, [['delivered', false]], 'and the attempt is counted')
})
