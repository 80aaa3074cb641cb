// The connection to PostgreSQL lost at the COMMIT of a key's creation or rotation, the changes that
// hand out a key's plaintext: the commit may have been made, its answer lost. Before (found by a
// review), the caller got a 503 while an active key stood in the store whose plaintext nobody had,
// and a retry made a second one. Now the store is asked whether the key's row is there: kept, the
// change succeeds and the key is handed out. Through a TCP gate in front of PostgreSQL that cuts the
// connection just before or just after the COMMIT goes through.
import t, { type Test } from 'tap'
import { openDb } from '../core/db.ts'
import { migratedDatabase, rejection, testServices } from './helpers/stores.ts'
import { gateInFront } from './helpers/tcp-gate.ts'

const actor = { actor: 'admin:tester' }

/** The key service on a store reached through a gate that cuts the connection of the statement `first` at its COMMIT. */
async function gated(t: Test, url: string, first: string, when: 'before' | 'after') {
  const { gate, url: through } = await gateInFront(t, url)
  const db = await openDb({ databaseUrl: through })
  t.teardown(() => db.close())
  return { keys: testServices(db).keys, cut: gate.cutOn(first, 'COMMIT\u0000', when) }
}

t.test('a key created, its commit made and its answer lost: the create succeeds, with the key that is in the store', async (t) => {
  const { url, direct } = await migratedDatabase(t)
  const { keys, cut } = await gated(t, url, 'INSERT INTO api_keys', 'after')
  const made = await keys.create({ name: 'kept', type: 'service' }, actor)
  await cut
  const found = await testServices(direct).keys.lookup(made.key)
  t.match(found, { key: { id: made.record.id, status: 'active' } }, 'the key handed out is the one kept, and it works')
  t.equal((await direct.query('SELECT id FROM api_keys WHERE name = $1', ['kept'])).length, 1, 'one key')
})

t.test('a key created, its commit not made: 503, and nothing kept', async (t) => {
  const { url, direct } = await migratedDatabase(t)
  const { keys, cut } = await gated(t, url, 'INSERT INTO api_keys', 'before')
  const err = await rejection(keys.create({ name: 'lost', type: 'service' }, actor))
  await cut
  t.equal(err.code, 'store_unavailable')
  t.same(await direct.query('SELECT id FROM api_keys WHERE name = $1', ['lost']), [], 'no key')
})

t.test('a key rotated, its commit made and its answer lost: the rotation succeeds, with the new key that is in the store', async (t) => {
  const { url, direct } = await migratedDatabase(t)
  const old = await testServices(direct).keys.create({ name: 'to-rotate', type: 'service' }, actor)
  const { keys, cut } = await gated(t, url, 'INSERT INTO api_keys', 'after')
  const rotated = await keys.rotate(old.record.id, {}, actor)
  await cut
  const found = await testServices(direct).keys.lookup(rotated.key)
  t.match(found, { key: { id: rotated.record.id, status: 'active' } }, 'the new key handed out is the one kept, and it works')
  t.match(await testServices(direct).keys.get(old.record.id), { status: 'rotating', replacedBy: rotated.record.id }, 'the old key is in its grace, replaced by it')
})

t.test('a key rotated, its commit not made: 503, and the old key as it was', async (t) => {
  const { url, direct } = await migratedDatabase(t)
  const old = await testServices(direct).keys.create({ name: 'not-rotated', type: 'service' }, actor)
  const { keys, cut } = await gated(t, url, 'INSERT INTO api_keys', 'before')
  const err = await rejection(keys.rotate(old.record.id, {}, actor))
  await cut
  t.equal(err.code, 'store_unavailable')
  t.match(await testServices(direct).keys.get(old.record.id), { status: 'active', replacedBy: null }, 'not rotated')
  t.equal((await direct.query('SELECT id FROM api_keys').then((r) => r.length)), 1, 'no second key')
})

/** A key, and the key service on a store whose connection is cut at the COMMIT of its revocation; the changes it tells. */
async function revoking(t: Test, when: 'before' | 'after') {
  const { url, direct } = await migratedDatabase(t)
  const made = await testServices(direct).keys.create({ name: `revoked-${when}`, type: 'service' }, actor)
  const { keys, cut } = await gated(t, url, "UPDATE api_keys SET status = 'revoked'", when)
  const told: string[] = []
  keys.onChanges((changes) => told.push(...changes.map((c) => `${c.action}:${c.key.id}`)))
  return { direct, made, keys, cut, told }
}

t.test('a key revoked, its commit made and its answer lost: the revocation succeeds, and the caches are told', async (t) => {
  // Before (found by a review): a 503 and no change told, and the retry was refused as already
  // revoked, telling none either; the key worked from every cache until the store check.
  const { direct, made, keys, cut, told } = await revoking(t, 'after')
  const revoked = await keys.revoke(made.record.id, 'leaked', actor)
  await cut
  t.match(revoked, { id: made.record.id, status: 'revoked', revokedReason: 'leaked' }, 'the revocation succeeds')
  t.same(told, [`revoked:${made.record.id}`], 'and is told to the caches')
  t.match(await testServices(direct).keys.get(made.record.id), { status: 'revoked' })
})

t.test('a key revoked, its commit not made: 503, the key as it was, nothing told', async (t) => {
  const { direct, made, keys, cut, told } = await revoking(t, 'before')
  const err = await rejection(keys.revoke(made.record.id, 'leaked', actor))
  await cut
  t.equal(err.code, 'store_unavailable')
  t.same(told, [], 'nothing told')
  t.match(await testServices(direct).keys.get(made.record.id), { status: 'active', revokedAt: null }, 'not revoked')
})
