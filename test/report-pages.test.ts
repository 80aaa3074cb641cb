// The expiring report, a webhook's delivery log and the usage report page with `cursor` and
// `next_cursor`, as /v1/keys and /v1/audit do. Found by a review: they stopped at `limit` (1,000,
// 500 and 1,000) with nothing to say more were left, and refused `cursor`: of 1,101 keys
// expiring, /v1/stats counted 1,101 and the report could list only 1,000.
import t from 'tap'
import type { Test } from 'tap'
import { createHash, randomUUID } from 'node:crypto'
import { startAdmin, type AdminHarness } from './helpers/admin.ts'
import { forEachStore } from './helpers/stores.ts'

const HOUR = 3_600_000

/** Every item of a list, following next_cursor from `path` (which holds a query already), from `cursor` when given. */
async function walk<T>(t: Test, h: AdminHarness, path: string, from: string | null = null): Promise<{ items: T[]; pages: Array<Record<string, unknown>> }> {
  const items: T[] = []
  const pages: Array<Record<string, unknown>> = []
  let cursor = from
  do {
    const page = await h.call('GET', `${path}${cursor ? `&cursor=${cursor}` : ''}`)
    t.equal(page.status, 200, `${path} answers`)
    items.push(...(page.json.items as T[]))
    pages.push(page.json)
    cursor = page.json.next_cursor
  } while (cursor && pages.length < 100)
  return { items, pages }
}

await forEachStore(t, async (t, store) => {
  const h = await startAdmin(t, store.db, { config: { webhooks: { allow_private: ['127.0.0.1/32'] } } })

  t.test('GET /v1/reports/expiring: every key, soonest first, each once', async (t) => {
    // Five expiry times, each shared by five keys: the order within a time is by id.
    const base = Date.now() + 2 * 86_400_000
    const rows = Array.from({ length: 25 }, (_, i) => ({
      key_hash: createHash('sha256').update(randomUUID()).digest('hex'),
      name: `expiring ${i}`,
      expires_at: new Date(base + (i % 5) * HOUR).toISOString(),
    }))
    await h.keys.importLegacy(rows, { actor: 'test' })
    const { items, pages } = await walk<{ id: string; ends_at: string }>(t, h, '/v1/reports/expiring?within_days=3&limit=7')
    t.equal(pages.length, 4, '25 keys in pages of 7')
    t.equal(pages[3]?.next_cursor, null, 'the last page says it is the last')
    t.equal(items.length, 25)
    t.equal(new Set(items.map((k) => k.id)).size, 25, 'no key twice')
    const order = items.map((k) => `${k.ends_at} ${k.id}`)
    t.same(order, [...order].sort(), 'soonest first, then by id')
    t.equal((await h.call('GET', '/v1/stats?expiring_within_days=3')).json.expiring_soon, 25, 'as many as /v1/stats counts')
    t.match((await h.call('GET', '/v1/reports/expiring?cursor=bm90LWEtY3Vyc29y')).json, { error: { code: 'validation_failed', message: /cursor/ } })
  })

  t.test('GET /v1/webhooks/{id}/deliveries: every delivery, newest first, each once', async (t) => {
    const made = await h.call('POST', '/v1/webhooks', { body: { url: 'http://127.0.0.1:9/pages', events: ['key.revoked'] } })
    t.equal(made.status, 201, JSON.stringify(made.json))
    const hook = made.json as { id: string }
    // As the store writes them: created_at is its now(), in microseconds; several share a millisecond.
    const at = new Date(Date.now() - HOUR)
    for (let i = 0; i < 13; i++) {
      await store.db.query(
        `INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, created_at)
         VALUES ($1, $2, 'key.revoked', '{}', 'delivered', 1, $3::timestamptz + $4 * interval '1 microsecond')`,
        [`msg_page_${String(i).padStart(2, '0')}`, hook.id, at, Math.floor(i / 4) * 1000 + (i % 4) * 250],
      )
    }
    const { items, pages } = await walk<{ id: string; created_at: string }>(t, h, `/v1/webhooks/${hook.id}/deliveries?limit=3`)
    t.equal(pages.length, 5)
    t.same(items.map((d) => d.id), Array.from({ length: 13 }, (_, i) => `msg_page_${String(12 - i).padStart(2, '0')}`), 'each once, newest first')
    const failed = await walk<{ id: string }>(t, h, `/v1/webhooks/${hook.id}/deliveries?limit=3&status=failed`)
    t.same(failed.items, [], 'the status filter holds on every page')
  })

  t.test('GET /v1/reports/usage: every key used in the range, by key id, each once', async (t) => {
    const bucket = new Date(Math.floor(Date.now() / HOUR) * HOUR - 2 * HOUR)
    const ids = Array.from({ length: 23 }, (_, i) => `usage${String(i).padStart(7, '0')}`)
    for (const [i, id] of ids.entries()) {
      await store.db.query('INSERT INTO api_key_usage (key_id, bucket, requests, rejected) VALUES ($1, $2, $3, 0)', [id, bucket, 100 + i])
    }
    const first = await h.call('GET', '/v1/reports/usage?limit=5')
    t.equal(first.json.items.length, 5)
    // Counts that grow during the walk (a key of a later page becomes the most used) move no key
    // across a page's end.
    await store.db.query('UPDATE api_key_usage SET requests = requests + 1000 WHERE key_id = $1', [ids[20]])
    const rest = await walk<{ key_id: string; requests: number }>(t, h, '/v1/reports/usage?limit=5', first.json.next_cursor)
    const items = [...first.json.items, ...rest.items] as Array<{ key_id: string; requests: number }>
    t.same(items.map((u) => u.key_id), ids, 'each key once, by id')
    t.equal(items[20]?.requests, 1120)
    t.ok(rest.pages.every((p) => p.to === first.json.to && p.from === first.json.from), 'every page reads the range of the first')
    t.equal(rest.pages.at(-1)?.next_cursor, null)
    const moved = await h.call('GET', `/v1/reports/usage?limit=5&cursor=${first.json.next_cursor}&to=${new Date(Date.now() + HOUR).toISOString()}`)
    t.match(moved, { status: 400, json: { error: { code: 'validation_failed', message: /^cursor: walks the range ending at / } } }, 'a cursor of another range is refused')
  })
})
