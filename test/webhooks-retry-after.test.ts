// A receiver that answers 429 or 503 with Retry-After is tried again no sooner than it asked (at
// most webhooks.retry_max_ms later), on both stores and on a controllable clock. Before (found by
// a review), the header was not read: a receiver rate-limiting keygate with `Retry-After: 120` was
// tried again after 5, 10, 20 and 40 s, each attempt spent while it had said it would refuse them.
import t from 'tap'
import { AuditCipher } from '../core/audit.ts'
import { EventBus } from '../core/events.ts'
import { silentLogger } from '../core/log.ts'
import { WebhookService } from '../core/webhooks.ts'
import { DEFAULT_CONFIG, TEST_ENCRYPTION_KEY, forEachStore, testClock } from './helpers/stores.ts'
import { startReceiver } from './helpers/webhooks.ts'

const ACTOR = { actor: 'test' }
const CIPHER = new AuditCipher(TEST_ENCRYPTION_KEY)

await forEachStore(t, async (t, store) => {
  const clock = testClock()
  const config = { ...DEFAULT_CONFIG.webhooks, allow_private: ['127.0.0.1/32'], retry_base_ms: 5000, retry_max_ms: 600_000, max_attempts: 5 }
  const s = new WebhookService({ db: store.db, cipher: CIPHER, config, log: silentLogger, now: clock.now, storeNow: clock.now })
  t.teardown(() => s.close())
  const bus = new EventBus({ now: clock.now })
  // The receiver answers each path with the status and Retry-After the path names.
  const answers: Record<string, [number, string | undefined]> = {
    '/seconds': [429, '120'],
    '/date': [503, new Date(clock.now().getTime() + 90_000).toUTCString()],
    '/beyond': [429, '86400'],
    '/shorter': [429, '1'],
    '/none': [429, undefined],
    '/garbage': [503, 'soon'],
  }
  const receiver = await startReceiver(t, (hook, res) => {
    const [status, after] = answers[hook.path] ?? [204, undefined]
    res.writeHead(status, after === undefined ? {} : { 'retry-after': after }).end()
  })
  const waits: Record<string, number> = {}
  for (const path of Object.keys(answers)) {
    const { webhook } = await s.create({ url: `${receiver.url}${path}`, events: ['key.revoked'] }, ACTOR)
    let captured: any
    const off = bus.on((e) => (captured = e))
    bus.emit('key.revoked', { key: { id: path } })
    off()
    await s.enqueue(captured)
    s.kick()
    await s.idle()
    const [row] = await store.db.query<{ next_attempt_at: Date; status: string; attempts: number; last_status: number; last_error: string }>(
      'SELECT next_attempt_at, status, attempts, last_status, last_error FROM webhook_deliveries WHERE webhook_id = $1',
      [webhook.id],
    )
    t.match(row, { status: 'pending', attempts: 1, last_status: answers[path]?.[0] }, `${path}: failed once, to be retried`)
    waits[path] = new Date(row?.next_attempt_at as Date).getTime() - clock.now().getTime()
    if (path === '/seconds') t.match(row?.last_error, /answered 429.*Retry-After/, 'the delivery log says what the receiver asked for')
    await s.remove(webhook.id, ACTOR)
  }
  t.same(waits, {
    '/seconds': 120_000,
    '/date': 90_000,
    '/beyond': 600_000,
    '/shorter': 5000,
    '/none': 5000,
    '/garbage': 5000,
  }, "Retry-After's seconds or date when longer than the backoff, at most retry_max_ms; the backoff otherwise")
})
