// The audit log: AES-256-GCM sealing of details, tamper detection, encryption key rotation, and
// where the key comes from.
import t from 'tap'
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes, randomUUID } from 'node:crypto'
import type { Test } from 'tap'
import { createCipheriv, createDecipheriv } from 'node:crypto'
import { AuditCipher, AuditLog, checkNewestSealed, checkStoreKey, encryptionKeyId, loadAuditCipher, type AuditRecord, type SealedRow } from '../core/audit.ts'
import type { Db } from '../core/db.ts'
import { createLogger } from '../core/log.ts'
import { forEachStore, rejection, TEST_ENCRYPTION_KEY } from './helpers/stores.ts'
import { runCliHere } from './helpers/cli.ts'
import { seedDataDir } from './helpers/pglite-template.ts'

const who = { actor: 'token', address: '2001:db8::7' }

/** The fields bound to a row's sealed details; `changes` replaces some. */
const row = (id: string, keyId: string | null, action: string, changes: Partial<SealedRow> = {}): SealedRow => ({
  id,
  keyId,
  action,
  actor: 'key:ADMIN0000001',
  address: '192.0.2.7',
  createdAt: new Date('2026-12-01T10:00:00.123Z'),
  ...changes,
})

/**
 * The one row of a listing that did not open, which is listed all the same: its id, no details,
 * its integrity and the problem. Throws when every row opened, or when more than one did not.
 */
async function unopened(listing: Promise<AuditRecord[]>): Promise<AuditRecord & { problem: string }> {
  const bad = (await listing).filter((r) => r.integrity !== 'verified')
  if (bad.length !== 1) throw new Error(`${bad.length} rows did not open, not one`)
  const row = bad[0] as AuditRecord
  if (row.details !== null || row.problem === undefined) throw new Error('a row that did not open has details, or no problem')
  return row as AuditRecord & { problem: string }
}

/** The ids of a key's trail read page by page (`limit` rows each) with the cursor, at most ten pages. */
async function walk(db: Db, log: AuditLog, keyId: string, limit: number): Promise<string[]> {
  const walked: string[] = []
  let cursor: string | undefined
  for (let page = 0; page < 10; page++) {
    const { items, nextCursor } = await log.pageAt(db, { keyId }, { limit, ...(cursor ? { cursor } : {}) })
    walked.push(...items.map((r) => r.id))
    if (!nextCursor) break
    cursor = nextCursor
  }
  return walked
}

function tempDir(t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-audit-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

async function writeRows(db: Db, log: AuditLog, n: number, keyId: string, action = 'key.updated'): Promise<string[]> {
  const rowIds: string[] = []
  for (let i = 0; i < n; i++) rowIds.push(await db.transaction((tx) => log.write(tx, who, { keyId, action, details: { i, note: `row ${i}` } })))
  return rowIds
}

t.test('AuditCipher', async (t) => {
  const cipher = new AuditCipher(TEST_ENCRYPTION_KEY)
  const details = { name: 'k', nested: { list: [1, 'two', null] }, unicode: 'Grüße ✓' }

  t.test('round trip', async (t) => {
    const sealed = cipher.seal(row('row-1', 'KEYID0000001', 'key.created'), details)
    t.equal(sealed.nonce.length, 12, '96-bit nonce')
    t.equal(sealed.encKeyId, encryptionKeyId(TEST_ENCRYPTION_KEY))
    t.equal(sealed.encKeyId, cipher.currentKeyId)
    t.notOk(sealed.details.toString('latin1').includes('Grüße'), 'details are not readable at rest')
    t.same(cipher.open(row('row-1', 'KEYID0000001', 'key.created'), 2, sealed.encKeyId, sealed.nonce, sealed.details), details)
    const again = cipher.seal(row('row-1', 'KEYID0000001', 'key.created'), details)
    t.notSame(again.nonce, sealed.nonce, 'a fresh nonce per row')
    t.notSame(again.details, sealed.details)
    const noKey = cipher.seal(row('row-2', null, 'admin.login'), {})
    t.same(cipher.open(row('row-2', null, 'admin.login'), 2, noKey.encKeyId, noKey.nonce, noKey.details), {})
  })

  t.test('any change fails authentication', async (t) => {
    const sealed = cipher.seal(row('row-1', 'KEYID0000001', 'key.created'), details)
    const fails = (what: string, open: () => unknown) => {
      let code: string | undefined
      try {
        open()
      } catch (err) {
        code = (err as { code?: string }).code
      }
      t.equal(code, 'audit_decrypt_failed', what)
    }
    for (let byte = 0; byte < sealed.details.length; byte++) {
      const body = Buffer.from(sealed.details)
      body[byte] = (body[byte] as number) ^ 0x01
      let code: string | undefined
      try {
        cipher.open(row('row-1', 'KEYID0000001', 'key.created'), 2, sealed.encKeyId, sealed.nonce, body)
      } catch (err) {
        code = (err as { code?: string }).code
      }
      if (code !== 'audit_decrypt_failed') t.fail(`a flipped bit in byte ${byte} of details went unnoticed`)
    }
    for (let byte = 0; byte < 12; byte++) {
      const nonce = Buffer.from(sealed.nonce)
      nonce[byte] = (nonce[byte] as number) ^ 0x80
      fails(`nonce byte ${byte} flipped`, () => cipher.open(row('row-1', 'KEYID0000001', 'key.created'), 2, sealed.encKeyId, nonce, sealed.details))
    }
    fails('another row id', () => cipher.open(row('row-2', 'KEYID0000001', 'key.created'), 2, sealed.encKeyId, sealed.nonce, sealed.details))
    fails('another key id', () => cipher.open(row('row-1', 'KEYID0000002', 'key.created'), 2, sealed.encKeyId, sealed.nonce, sealed.details))
    fails('no key id', () => cipher.open(row('row-1', null, 'key.created'), 2, sealed.encKeyId, sealed.nonce, sealed.details))
    fails('another action', () => cipher.open(row('row-1', 'KEYID0000001', 'key.revoked'), 2, sealed.encKeyId, sealed.nonce, sealed.details))
    fails('truncated', () => cipher.open(row('row-1', 'KEYID0000001', 'key.created'), 2, sealed.encKeyId, sealed.nonce, sealed.details.subarray(0, 10)))
    fails('short nonce', () => cipher.open(row('row-1', 'KEYID0000001', 'key.created'), 2, sealed.encKeyId, sealed.nonce.subarray(0, 8), sealed.details))
    fails('unknown encryption key', () => cipher.open(row('row-1', 'KEYID0000001', 'key.created'), 2, '0000000000000000', sealed.nonce, sealed.details))
    const original = row('row-1', 'KEYID0000001', 'key.created')
    fails('another actor', () => cipher.open({ ...original, actor: 'key:ADMIN0000002' }, 2, sealed.encKeyId, sealed.nonce, sealed.details))
    fails('another address', () => cipher.open({ ...original, address: '198.51.100.1' }, 2, sealed.encKeyId, sealed.nonce, sealed.details))
    fails('no address', () => cipher.open({ ...original, address: null }, 2, sealed.encKeyId, sealed.nonce, sealed.details))
    fails('another time', () => cipher.open({ ...original, createdAt: new Date(original.createdAt.getTime() + 1) }, 2, sealed.encKeyId, sealed.nonce, sealed.details))
    fails('read as format 1', () => cipher.open(original, 1, sealed.encKeyId, sealed.nonce, sealed.details))
  })

  t.test('a row sealed in format 1 (id, key id and action bound) still opens as format 1, and only so', async (t) => {
    // Sealed as keygate sealed rows before format 2, independently of core/audit.ts.
    const nonce = randomBytes(12)
    const cipher1 = createCipheriv('aes-256-gcm', TEST_ENCRYPTION_KEY, nonce)
    cipher1.setAAD(Buffer.from('row-1\nKEYID0000001\nkey.created'))
    const body = Buffer.concat([cipher1.update(JSON.stringify(details), 'utf8'), cipher1.final(), cipher1.getAuthTag()])
    const original = row('row-1', 'KEYID0000001', 'key.created')
    t.same(cipher.open(original, 1, cipher.currentKeyId, nonce, body), details)
    t.same(cipher.open({ ...original, actor: 'anyone', address: null }, 1, cipher.currentKeyId, nonce, body), details, 'format 1 did not bind the actor or address')
    t.throws(() => cipher.open(original, 2, cipher.currentKeyId, nonce, body), { code: 'audit_decrypt_failed' }, 'nor is it read as format 2')
  })

  t.test('keys must be 32 bytes', async (t) => {
    t.throws(() => new AuditCipher(randomBytes(16)), { code: 'config_invalid' })
    t.throws(() => new AuditCipher(randomBytes(32), [randomBytes(31)]), { code: 'config_invalid' })
  })
})

await forEachStore(t, async (t, store) => {
  const { db } = store
  const log = new AuditLog(new AuditCipher(TEST_ENCRYPTION_KEY))

  t.test('written rows list back decrypted, newest first', async (t) => {
    const keyId = randomUUID().slice(0, 12)
    const rowIds = await writeRows(db, log, 3, keyId)
    const rows = await log.list(db, { keyId })
    t.equal(rows.length, 3)
    t.same(new Set(rows.map((r) => r.id)), new Set(rowIds))
    for (const r of rows) {
      t.match(r, { keyId, action: 'key.updated', actor: 'token', address: '2001:db8::7' })
      t.ok(r.createdAt instanceof Date)
    }
    t.same(rows.map((r) => r.details?.i).sort(), [0, 1, 2])
    for (let i = 1; i < rows.length; i++) t.ok((rows[i - 1] as AuditRecord).createdAt >= (rows[i] as AuditRecord).createdAt, 'newest first')
    const stored = await db.query<{ enc_key_id: string; nonce: Uint8Array }>('SELECT enc_key_id, nonce FROM api_key_audit_log WHERE key_id = $1', [keyId])
    t.ok(stored.every((r) => r.enc_key_id === encryptionKeyId(TEST_ENCRYPTION_KEY) && r.nonce.length === 12), 'each row names its encryption key')
  })

  t.test('a rolled-back transaction leaves no audit row', async (t) => {
    const keyId = randomUUID().slice(0, 12)
    await rejection(
      db.transaction(async (tx) => {
        await log.write(tx, who, { keyId, action: 'key.updated' })
        throw new Error('abort')
      }),
    )
    t.same(await log.list(db, { keyId }), [])
  })

  t.test('list pages with the before cursor: every row once', async (t) => {
    const keyId = randomUUID().slice(0, 12)
    // Rows written in one transaction share created_at (now() is the transaction's start).
    await db.transaction(async (tx) => {
      for (let i = 0; i < 7; i++) await log.write(tx, who, { keyId, action: 'key.updated', details: { i } })
    })
    await writeRows(db, log, 4, keyId)
    const all = await log.list(db, { keyId })
    t.equal(all.length, 11)
    const seen: string[] = []
    let before: { at: Date; id: string } | undefined
    for (let page = 0; page < 20; page++) {
      const rows: AuditRecord[] = await log.list(db, { keyId, limit: 3, ...(before ? { before } : {}) })
      seen.push(...rows.map((r) => r.id))
      const last = rows[rows.length - 1]
      if (!last || rows.length < 3) break
      before = { at: last.createdAt, id: last.id }
    }
    t.same(seen, all.map((r) => r.id), 'the pages together are the whole list, in order')
  })

  t.test('a flipped bit in stored details or nonce fails with audit_decrypt_failed', async (t) => {
    for (const column of ['details', 'nonce']) {
      const keyId = randomUUID().slice(0, 12)
      const [rowId] = await writeRows(db, log, 1, keyId)
      t.equal((await log.list(db, { keyId })).length, 1)
      await db.query(`UPDATE api_key_audit_log SET ${column} = set_byte(${column}, 3, get_byte(${column}, 3) # 4) WHERE id = $1`, [rowId])
      const bad = await unopened(log.list(db, { keyId }))
      t.equal(bad.integrity, 'failed', column)
      t.equal(bad.id, rowId, 'the row is listed')
      t.match(bad.problem, rowId as string, 'the problem names the row')
    }
  })

  t.test("a row's details copied onto another row fail to open", async (t) => {
    const keyId = randomUUID().slice(0, 12)
    const [a, b] = await writeRows(db, log, 2, keyId)
    await db.query(
      `UPDATE api_key_audit_log SET nonce = src.nonce, details = src.details FROM api_key_audit_log src WHERE api_key_audit_log.id = $1 AND src.id = $2`,
      [b, a],
    )
    const bad = await unopened(log.list(db, { keyId }))
    t.equal(bad.integrity, 'failed')
    t.equal(bad.id, b, 'the row whose details are not its own')
    t.same((await log.list(db, { keyId })).map((r) => r.integrity).sort(), ['failed', 'verified'], 'and the other is read as before')

    const other = randomUUID().slice(0, 12)
    const [c] = await writeRows(db, log, 1, other)
    await db.query('UPDATE api_key_audit_log SET action = $2 WHERE id = $1', [c, 'key.revoked'])
    t.equal((await unopened(log.list(db, { keyId: other }))).integrity, 'failed', 'a changed action is noticed')
  })

  t.test("a row's actor, address, time or format changed in the store fails to open", async (t) => {
    const changes: Array<[string, string, unknown[]]> = [
      ['actor', 'actor = $2', ['key:SOMEONEELSE1']],
      ['address', 'address = $2', ['198.51.100.9']],
      ['address removed', 'address = NULL', []],
      ['time', "created_at = created_at - interval '1 hour'", []],
      ['format', 'format = 1', []],
    ]
    for (const [what, set, params] of changes) {
      const keyId = randomUUID().slice(0, 12)
      const [rowId] = await writeRows(db, log, 1, keyId)
      t.equal((await log.list(db, { keyId })).length, 1, `${what}: opens before`)
      await db.query(`UPDATE api_key_audit_log SET ${set} WHERE id = $1`, [rowId, ...params])
      t.equal((await unopened(log.list(db, { keyId }))).integrity, 'failed', `${what}: noticed`)
    }
    const stored = await db.query<{ format: number }>('SELECT DISTINCT format FROM api_key_audit_log WHERE key_id IS NOT NULL AND action = $1', ['key.updated'])
    t.ok(stored.some((r) => r.format === 2), 'rows are written in format 2')
  })

  t.test("a row's encryption key id changed in the store lists as altered, not as sealed with a dropped key, and does not stop a start", async (t) => {
    const keyId = randomUUID().slice(0, 12)
    const [rowId] = await writeRows(db, log, 1, keyId)
    await db.query('UPDATE api_key_audit_log SET enc_key_id = $2 WHERE id = $1', [rowId, '0000000000000000'])
    const altered = await unopened(log.list(db, { keyId }))
    t.equal(altered.integrity, 'failed', 'a configured key opens it: its key id was altered (before: key_missing, as after a rotation)')
    t.match(altered.problem, new RegExp(`names encryption key 0000000000000000, but was sealed with configured key ${encryptionKeyId(TEST_ENCRYPTION_KEY)}: the row was altered`))
    const stranger = await unopened(new AuditLog(new AuditCipher(randomBytes(32))).list(db, { keyId }))
    t.equal(stranger.integrity, 'key_missing', 'no configured key opens it: sealed with a key that is not configured, as far as this process can tell')
    await t.resolves(checkNewestSealed(db, new AuditCipher(TEST_ENCRYPTION_KEY)), 'the newest row so altered does not keep an instance with the right key from starting')
    await t.rejects(checkNewestSealed(db, new AuditCipher(randomBytes(32))), { code: 'encryption_key_missing' }, 'a wrong key is still refused')
  })

  t.test("a row cut short or with a nonce of another length, its encryption key id changed too, lists as damaged, not as sealed with that key, and does not stop a start", async (t) => {
    const damage: Array<[string, string]> = [
      ['details cut short', 'details = substring(details from 1 for 5)'],
      ['details emptied', "details = ''::bytea"],
      ['nonce cut short', 'nonce = substring(nonce from 1 for 4)'],
      ['nonce emptied', "nonce = ''::bytea"],
    ]
    for (const [what, set] of damage) {
      const keyId = randomUUID().slice(0, 12)
      const [rowId] = await writeRows(db, log, 1, keyId)
      await db.query(`UPDATE api_key_audit_log SET ${set}, enc_key_id = $2 WHERE id = $1`, [rowId, '0000000000000000'])
      const damaged = await unopened(log.list(db, { keyId }))
      t.equal(damaged.integrity, 'failed', `${what}: no key seals such a row (before: key_missing, sealed with 0000000000000000)`)
      t.equal(damaged.sealedWith, undefined, `${what}: names no key to add`)
      t.match(damaged.problem, /is damaged/, what)
      await t.resolves(checkNewestSealed(db, new AuditCipher(TEST_ENCRYPTION_KEY)), `${what}: the newest row so damaged does not keep an instance with the right key from starting`)
    }
  })

  t.test("the store's key check altered in the store: naming a configured key, it is sealed anew with a warning; naming another, refused", async (t) => {
    const right = new AuditCipher(TEST_ENCRYPTION_KEY)
    await db.query('DELETE FROM encryption_key_check')
    await checkStoreKey(db, right)
    const check = async () => ((await db.query<{ sealed: string }>('SELECT sealed FROM encryption_key_check'))[0] as { sealed: string }).sealed
    const made = await check()
    t.equal(made.split('.')[0], right.currentKeyId, 'made under the current key')
    await checkStoreKey(db, right)
    t.equal(await check(), made, 'and left as it is while it opens with the current key')
    // Its sealed text changed: it names the configured key, and no longer opens with it.
    await db.query(`UPDATE encryption_key_check SET sealed = $1`, [`${right.currentKeyId}.${Buffer.alloc(40).toString('base64url')}`])
    const lines: string[] = []
    await t.resolves(checkStoreKey(db, right, { log: createLogger({ level: 'info', write: (l) => void lines.push(l) }) }), 'the right key starts')
    t.match(lines.join(''), /"level":"warn".*does not open with it: it was altered in the store, and is sealed anew/)
    t.equal((await check()).split('.')[0], right.currentKeyId)
    t.not(await check(), made)
    await t.rejects(checkStoreKey(db, new AuditCipher(randomBytes(32))), { code: 'encryption_key_missing', message: /the store's encryption key check \(table encryption_key_check\) was sealed with encryption key/ }, 'a wrong key is refused')
    // Its key id changed to one no configured key has: the keys it would name are not these.
    await db.query(`UPDATE encryption_key_check SET sealed = '0000000000000000' || substr(sealed, 17)`)
    await t.rejects(checkStoreKey(db, right), { code: 'encryption_key_missing', message: /sealed with encryption key 0000000000000000/ })
    await db.query('DELETE FROM encryption_key_check')
  })

  t.test('an upgraded store with an empty log and webhook secrets sealed with several keys: a refusal names them as a list', async (t) => {
    // Before: "sealed with encryption key a, b, which is not configured … set KEYGATE_ENCRYPTION_KEY
    // to the key this store was started with (a, b) again".
    const keyA = randomBytes(32)
    const [a, b] = [new AuditCipher(keyA), new AuditCipher(randomBytes(32))]
    const ids = [a.currentKeyId, b.currentKeyId].sort()
    const rollback = new Error('rolled back')
    await t.rejects(
      db.transaction(async (tx) => {
        await tx.query('DELETE FROM api_key_audit_log')
        await tx.query('DELETE FROM encryption_key_check')
        await tx.query(`INSERT INTO webhooks (id, url, events, sealed_secret, sealed_previous_secret, created_by) VALUES ('wh_two_keys', 'https://example.com/hook', '{key.created}', $1, $2, 'test')`, [b.sealSecret('webhook wh_two_keys', 'whsec_new'), a.sealSecret('webhook wh_two_keys', 'whsec_old')])
        const stranger = new AuditCipher(randomBytes(32))
        await t.rejects(checkStoreKey(tx, stranger, { readOnly: true }), {
          code: 'encryption_key_missing',
          message: `the audit log is empty, and the webhook secrets are sealed with encryption keys ${ids[0]} and ${ids[1]}, none of which is configured (the current key is ${stranger.currentKeyId}, and no key of KEYGATE_PREVIOUS_ENCRYPTION_KEYS is any of them): set KEYGATE_ENCRYPTION_KEY to the key the store's other instances use`,
        })
        const embedded = new AuditCipher(randomBytes(32), [], {})
        await t.rejects(checkStoreKey(tx, embedded, { readOnly: true }), { message: `KEYGATE_PREVIOUS_ENCRYPTION_KEYS nor the embedded store's key file holds any of them): set KEYGATE_ENCRYPTION_KEY to the key this store was started with (${ids[0]} or ${ids[1]}) again` })
        await t.resolves(checkStoreKey(tx, new AuditCipher(randomBytes(32), [keyA]), { readOnly: true }), 'a process holding one of them passes')
        throw rollback
      }),
      rollback,
    )
  })

  t.test("a row's time set in the store to one no JavaScript date holds is listed as altered; its page, the pages after it and its key's next change work", async (t) => {
    // Before (found by a review): the drivers read 'infinity' as a number and a time past year
    // 275760 as an invalid date, the listing threw on it (`r.createdAt.toISOString is not a
    // function`, a 500 for the page), and an infinite time sorts first, so no page of the log
    // could be read; the key's next change (its revocation too) failed the same way, as its row's
    // time was read as later than the altered one.
    const keyId = randomUUID().slice(0, 12)
    const rowIds = await writeRows(db, log, 4, keyId)
    const times = ['infinity', '280000-01-01T00:00:00Z', '12000-01-01T00:00:00Z']
    for (const [i, time] of times.entries()) await db.query('UPDATE api_key_audit_log SET created_at = $2 WHERE id = $1', [rowIds[i], time])
    const rows = await log.list(db, { keyId })
    t.same(rows.map((r) => r.id), rowIds, 'every row listed, the altered ones first as the store orders them')
    t.same(rows.map((r) => r.integrity), ['failed', 'failed', 'failed', 'verified'])
    for (const r of rows.slice(0, 3)) {
      t.equal(r.createdAt.toISOString(), '9999-12-31T23:59:59.999Z', 'the latest time a cursor holds')
      t.match(r.problem, 'is not a time keygate writes')
    }
    const walked = await walk(db, log, keyId, 3)
    t.same(walked, rows.map((r) => r.id), 'paged through: every row once')
    const [next] = await writeRows(db, log, 1, keyId)
    t.equal((await log.list(db, { keyId })).find((r) => r.id === next)?.integrity, 'verified', "the key's next change is written and opens")
    await t.rejects(checkNewestSealed(db, new AuditCipher(randomBytes(32))), { code: 'encryption_key_missing' }, 'a wrong key is still refused: the check reads the newest row keygate wrote')
    await t.resolves(checkNewestSealed(db, new AuditCipher(TEST_ENCRYPTION_KEY)))
  })

  t.test("a row's time set in the store into the future (a time a JavaScript date holds) is listed as altered, and its key's next change keeps the store's clock", async (t) => {
    // Before (found by a review): the next change of the key was stamped just after the altered
    // time (a row is later than every row of its key), so one row set to 2999 made every later
    // row of the key, which opened as verified, claim year 2999: listed above every other change
    // of the log for good, and never pruned.
    const keyId = randomUUID().slice(0, 12)
    const [altered] = await writeRows(db, log, 1, keyId)
    await db.query("UPDATE api_key_audit_log SET created_at = '2999-01-01T00:00:00Z' WHERE id = $1", [altered])
    const [next] = await writeRows(db, log, 1, keyId)
    const rows = await log.list(db, { keyId })
    t.same(rows.map((r) => [r.id, r.integrity]), [[altered, 'failed'], [next, 'verified']], 'the altered row first, as the store orders it, and failed')
    const written = rows.find((r) => r.id === next) as AuditRecord
    t.ok(written.createdAt.getUTCFullYear() < 2100, `the next change is stamped at the store's clock, not after the altered time (${written.createdAt.toISOString()})`)
  })

  t.test("a row's time moved in the store by less than a millisecond is listed as altered, and paging does not skip the rows beside it", async (t) => {
    // Before (found by a review): the drivers read a time to the millisecond, so a row moved by
    // 0.5 ms opened as verified (its bound time read back unchanged), and the cursor after it, at
    // its time cut to the millisecond, passed over the rows of its millisecond it now sorted above.
    const keyId = randomUUID().slice(0, 12)
    await db.transaction((tx) => log.writeMany(tx, who, [0, 1, 2].map((i) => ({ keyId, action: 'key.updated', details: { i } }))))
    const ids = (await log.list(db, { keyId })).map((r) => r.id)
    const lowest = ids.at(-1) as string
    await db.query("UPDATE api_key_audit_log SET created_at = created_at + interval '500 microseconds' WHERE id = $1", [lowest])
    const rows = await log.list(db, { keyId })
    t.same(rows.map((r) => [r.id, r.integrity]), [[lowest, 'failed'], ...ids.slice(0, 2).map((id) => [id, 'verified'])], 'the moved row first, as the store orders it, and failed')
    t.match(rows[0]?.problem, 'is not a time keygate writes')
    const walked = await walk(db, log, keyId, 1)
    t.same(walked, rows.map((r) => r.id), 'paged one row at a time: every row once')
    // Format 1 binds no time: such a row is read as before, whatever its time.
    const [unbound] = await writeRows(db, new AuditLog(new AuditCipher(TEST_ENCRYPTION_KEY), 1), 1, keyId)
    await db.query("UPDATE api_key_audit_log SET created_at = created_at + interval '500 microseconds' WHERE id = $1", [unbound])
    t.equal((await log.list(db, { keyId })).find((r) => r.id === unbound)?.integrity, 'verified', 'a format 1 row with a time to the microsecond opens')
  })

  t.test('seal format 1 (a rolling upgrade from before migration 0006): rows a version of then can read', async (t) => {
    // How a version before format 2 read a row, independently of core/audit.ts: id, key id and
    // action as associated data, whatever the format column says.
    const readAsBefore = async (rowId: string): Promise<unknown> => {
      const [r] = await db.query<{ id: string; key_id: string | null; action: string; nonce: Uint8Array; details: Uint8Array }>('SELECT id, key_id, action, nonce, details FROM api_key_audit_log WHERE id = $1', [rowId])
      const body = Buffer.from(r?.details as Uint8Array)
      const decipher = createDecipheriv('aes-256-gcm', TEST_ENCRYPTION_KEY, Buffer.from(r?.nonce as Uint8Array))
      decipher.setAAD(Buffer.from(`${r?.id}\n${r?.key_id ?? ''}\n${r?.action}`))
      decipher.setAuthTag(body.subarray(body.length - 16))
      return JSON.parse(Buffer.concat([decipher.update(body.subarray(0, body.length - 16)), decipher.final()]).toString('utf8'))
    }
    const keyId = randomUUID().slice(0, 12)
    const compatible = new AuditLog(new AuditCipher(TEST_ENCRYPTION_KEY), 1)
    const [old] = await writeRows(db, compatible, 1, keyId)
    const [current] = await writeRows(db, log, 1, keyId)
    const formats = await db.query<{ id: string; format: number }>('SELECT id, format FROM api_key_audit_log WHERE key_id = $1', [keyId])
    t.same(Object.fromEntries(formats.map((r) => [r.id, r.format])), { [old as string]: 1, [current as string]: 2 }, 'each row records the format it was sealed in')
    t.same(await readAsBefore(old as string), { i: 0, note: 'row 0' }, 'a version before migration 0006 reads a format 1 row')
    await t.rejects(readAsBefore(current as string), { message: /unable to authenticate data/ }, 'but not a format 2 one (why the setting exists): its associated data differs')
    t.same((await log.list(db, { keyId })).map((r) => r.details), [{ i: 0, note: 'row 0' }, { i: 0, note: 'row 0' }], 'this version reads both')
  })

  t.test('rows of one transaction share its time; rows of another have their own', async (t) => {
    const keyId = randomUUID().slice(0, 12)
    await db.transaction(async (tx) => {
      await log.write(tx, who, { keyId, action: 'key.updated' })
      await new Promise((resolve) => setTimeout(resolve, 5))
      await log.write(tx, who, { keyId, action: 'key.updated' })
    })
    await new Promise((resolve) => setTimeout(resolve, 5))
    await writeRows(db, log, 1, keyId)
    const times = (await log.list(db, { keyId })).map((r) => r.createdAt.getTime())
    t.equal(times.length, 3)
    t.equal(new Set(times).size, 2, 'two times: one per transaction')
  })

  t.test('encryption key rotation: old rows open when the old key is passed as previous', async (t) => {
    const oldKey = randomBytes(32)
    const newKey = randomBytes(32)
    const keyId = randomUUID().slice(0, 12)
    await writeRows(db, new AuditLog(new AuditCipher(oldKey)), 2, keyId, 'key.created')
    const rotated = new AuditLog(new AuditCipher(newKey, [oldKey]))
    await writeRows(db, rotated, 2, keyId, 'key.updated')
    const rows = await rotated.list(db, { keyId })
    t.equal(rows.length, 4)
    t.same(rows.map((r) => r.action).sort(), ['key.created', 'key.created', 'key.updated', 'key.updated'])
    const sealedWith = await db.query<{ action: string; enc_key_id: string }>('SELECT action, enc_key_id FROM api_key_audit_log WHERE key_id = $1', [keyId])
    for (const r of sealedWith) {
      t.equal(r.enc_key_id, encryptionKeyId(r.action === 'key.created' ? oldKey : newKey), 'new rows are sealed with the new key')
    }

    const forgetful = new AuditLog(new AuditCipher(newKey))
    const listed = await forgetful.list(db, { keyId })
    t.same(listed.map((r) => [r.action, r.integrity]).sort(), [['key.created', 'key_missing'], ['key.created', 'key_missing'], ['key.updated', 'verified'], ['key.updated', 'verified']], 'without the old key, its rows are listed as key_missing, and the new ones are read')
    const missing = listed.find((r) => r.integrity === 'key_missing') as AuditRecord
    t.equal(missing.details, null)
    t.match(missing.problem, encryptionKeyId(oldKey), 'names the missing encryption key')
    t.match(missing.problem, 'KEYGATE_PREVIOUS_ENCRYPTION_KEYS', 'says where to add it')
    t.same((await new AuditLog(new AuditCipher(oldKey)).list(db, { keyId })).map((r) => r.integrity).sort(), ['key_missing', 'key_missing', 'verified', 'verified'], 'the old key alone cannot read new rows')
  })
})

t.test('loadAuditCipher', async (t) => {
  const configured = randomBytes(32)

  t.test('uses KEYGATE_ENCRYPTION_KEY and the previous keys', async (t) => {
    const old = randomBytes(32)
    const c = loadAuditCipher({ encryptionKey: configured.toString('base64'), previousKeys: [old.toString('base64')], storeKind: 'postgres' })
    t.equal(c.currentKeyId, encryptionKeyId(configured))
    const sealed = new AuditCipher(old).seal(row('r', null, 'a'), { x: 1 })
    t.same(c.open(row('r', null, 'a'), 2, sealed.encKeyId, sealed.nonce, sealed.details), { x: 1 })
    t.throws(() => loadAuditCipher({ encryptionKey: randomBytes(16).toString('base64'), storeKind: 'postgres' }), { code: 'config_invalid' })
  })

  t.test('PostgreSQL without a key is refused', async (t) => {
    const dir = tempDir(t)
    t.throws(() => loadAuditCipher({ storeKind: 'postgres', dataDir: dir }), { code: 'encryption_key_missing', message: /KEYGATE_ENCRYPTION_KEY.*openssl rand -base64 32/ })
    t.throws(() => loadAuditCipher({ storeKind: 'postgres', encryptionKey: '', dataDir: dir }), { code: 'encryption_key_missing' })
    t.same(readdirSync(dir), [], 'no key file is generated for PostgreSQL')
  })

  t.test('a key file others may read is closed to them, with a warning', async (t) => {
    // Before (found by a review), a key file restored with cp (0644 under umask 022) into a data
    // folder made by an operator or systemd (0755) was read as it was: every local user could
    // read the key of the audit details and webhook secrets, and nothing said so.
    for (const [what, use] of [
      ['the generated key', (dir: string, log: ReturnType<typeof createLogger>) => loadAuditCipher({ storeKind: 'embedded', dataDir: dir, log })],
      ['a previous key beside a configured one', (dir: string, log: ReturnType<typeof createLogger>) => loadAuditCipher({ storeKind: 'embedded', dataDir: dir, log, encryptionKey: configured.toString('base64') })],
    ] as const) {
      const dir = tempDir(t)
      const file = join(dir, 'encryption.key')
      const key = randomBytes(32).toString('base64')
      writeFileSync(file, key + '\n')
      chmodSync(file, 0o644)
      const lines: string[] = []
      use(dir, createLogger({ level: 'debug', write: (l) => lines.push(l) }))
      t.equal(statSync(file).mode & 0o777, 0o600, `${what}: the file is its owner's only`)
      t.equal(lines.length, 1, `${what}: one line`)
      t.match(lines.map((l) => JSON.parse(l) as unknown), [{ level: 'warn', message: /readable by other users/, file, mode: '0644' }], `${what}: a warning says so`)
      t.notOk(lines.some((l) => l.includes(key)), `${what}: the key is not logged`)
    }
  })

  t.test('the embedded store generates a key file once, with a warning, and reuses it', async (t) => {
    const dir = tempDir(t)
    const lines: string[] = []
    const log = createLogger({ level: 'debug', write: (l) => lines.push(l) })
    const first = loadAuditCipher({ storeKind: 'embedded', dataDir: dir, log })
    const file = join(dir, 'encryption.key')
    t.equal(statSync(file).mode & 0o777, 0o600, 'the key file is mode 0600')
    const key = Buffer.from(readFileSync(file, 'utf8').trim(), 'base64')
    t.equal(key.length, 32)
    t.equal(first.currentKeyId, encryptionKeyId(key))
    t.equal(lines.length, 1)
    const warning = JSON.parse(lines[0] as string) as Record<string, unknown>
    t.match(warning, { level: 'warn', message: /generated an audit encryption key/, file })
    t.notOk((lines[0] as string).includes(key.toString('base64')), 'the key itself is not logged')

    const second = loadAuditCipher({ storeKind: 'embedded', dataDir: dir, log })
    t.equal(second.currentKeyId, first.currentKeyId, 'the same key next time')
    t.equal(lines.length, 1, 'no second warning')
    const sealed = first.seal(row('r', 'k', 'a'), { same: true })
    t.same(second.open(row('r', 'k', 'a'), 2, sealed.encKeyId, sealed.nonce, sealed.details), { same: true })

    const explicit = loadAuditCipher({ storeKind: 'embedded', dataDir: dir, encryptionKey: configured.toString('base64') })
    t.equal(explicit.currentKeyId, encryptionKeyId(configured), 'a configured key wins over the file')
    // Before, what the generated key had sealed could no longer be read once a key was configured.
    t.same(explicit.open(row('r', 'k', 'a'), 2, sealed.encKeyId, sealed.nonce, sealed.details), { same: true }, 'and the generated key opens what it sealed, as a previous key')

    const lost = tempDir(t)
    t.throws(
      () => loadAuditCipher({ storeKind: 'embedded', dataDir: lost, sealed: [first.currentKeyId] }),
      { code: 'encryption_key_missing', message: new RegExp(`encryption\\.key is missing, but the store holds audit rows or webhook secrets sealed with encryption key ${first.currentKeyId}: restore the file`) },
      'a store holding rows sealed with a key file that is gone: refused',
    )
    t.same(readdirSync(lost), [], 'and no new key is generated over them')
    // Rows of two keys (a rotation before the file was lost): named as a list (before, found by a
    // read-back, "sealed with encryption key a, b: … set KEYGATE_ENCRYPTION_KEY to that key").
    t.throws(
      () => loadAuditCipher({ storeKind: 'embedded', dataDir: lost, sealed: ['k1a2b3c4', 'k5e6f7a8'] }),
      {
        code: 'encryption_key_missing',
        message: `${join(lost, 'encryption.key')} is missing, but the store holds audit rows or webhook secrets sealed with encryption keys k1a2b3c4 and k5e6f7a8: restore the file from its backup (or set KEYGATE_ENCRYPTION_KEY to one of them, and list the others in KEYGATE_PREVIOUS_ENCRYPTION_KEYS); a new key could open none of them`,
      },
      'several keys lacking: named as a list',
    )
    const restored = loadAuditCipher({ storeKind: 'embedded', dataDir: lost, sealed: [first.currentKeyId], previousKeys: [key.toString('base64')] })
    t.not(restored.currentKeyId, first.currentKeyId, 'with the lost key among the previous keys, a new one is generated')
    t.same(restored.open(row('r', 'k', 'a'), 2, sealed.encKeyId, sealed.nonce, sealed.details), { same: true }, 'and the old rows open')
  })

  t.test('the embedded store whose key file was lost refuses to start rather than seal over its rows (the real command)', async (t) => {
    const dataDir = await seedDataDir(join(tempDir(t), 'store'))
    const env = { KEYGATE_DATA_DIR: dataDir, DATABASE_URL: undefined, KEYGATE_CONFIG: undefined, KEYGATE_ENCRYPTION_KEY: undefined, REDIS_URL: undefined }
    const created = await runCliHere(['api-key', 'create', '--type', 'user', '--name', 'sealed', '--json'], { env })
    t.equal(created.code, 0, created.stderr)
    const file = join(dataDir, 'encryption.key')
    rmSync(file)
    const refused = await runCliHere(['api-key', 'list', '--json'], { env })
    t.equal(refused.code, 1)
    t.equal(refused.json().error.code, 'encryption_key_missing')
    t.match(refused.json().error.message, /restore the file from its backup/)
    t.notOk(existsSync(file), 'no key was generated')
    const fresh = await seedDataDir(join(tempDir(t), 'fresh'))
    t.equal((await runCliHere(['api-key', 'list', '--json'], { env: { ...env, KEYGATE_DATA_DIR: fresh } })).code, 0, 'a store with nothing sealed generates its key, as before')
    t.ok(existsSync(join(fresh, 'encryption.key')))
  })

  t.test('a damaged key file is refused', async (t) => {
    const dir = tempDir(t)
    writeFileSync(join(dir, 'encryption.key'), 'c2hvcnQ=\n', { mode: 0o600 })
    t.throws(() => loadAuditCipher({ storeKind: 'embedded', dataDir: dir }), { code: 'config_invalid', message: /encryption\.key/ })
    const folder = tempDir(t)
    mkdirSync(join(folder, 'encryption.key'))
    t.throws(() => loadAuditCipher({ storeKind: 'embedded', dataDir: folder }), { code: 'config_invalid', message: /encryption\.key cannot be read: it is a folder/ }, 'a folder where the key file belongs is named, not EISDIR')
  })
})
