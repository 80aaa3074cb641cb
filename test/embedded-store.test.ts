// The embedded store runs PGlite on its own thread (core/embedded-worker.ts): what crosses the
// thread must arrive as it would from PGlite itself (rows, bytea, dates, a PostgreSQL error's
// SQLSTATE and fields), transactions must still commit, roll back and run one at a time, a
// query must not stop the calling thread, and a closed store must refuse, not hang.
import t from 'tap'
import { chmodSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { openDb, sqlState, UNIQUE_VIOLATION } from '../core/db.ts'
import { forEachStore, memoryDb, rejection, TEST_ENCRYPTION_KEY } from './helpers/stores.ts'
import { loadConfig } from '../config/load.ts'
import { silentLogger } from '../core/log.ts'
import { openRuntime } from '../core/runtime.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { migrate, readMigrations } from '../core/migrate.ts'

t.test('rows, values and errors cross the thread as PGlite gives them', async (t) => {
  // A store from the tests' initialised folder (helpers/pglite-template.ts), lent on to the next
  // test: what crosses the thread does not depend on how the store was made, and PGlite's initdb
  // cost about 6 s of CPU here. The store made from nothing is the closed store's test below (and
  // openDb's in-memory store, test/key-cache-marks.test.ts).
  const db = await memoryDb()
  t.teardown(() => db.close())
  await db.exec('CREATE TABLE t (id int PRIMARY KEY, b bytea, at timestamptz, j jsonb)')
  const at = new Date('2026-01-02T03:04:05.678Z')
  await db.query('INSERT INTO t VALUES ($1, $2, $3, $4)', [1, Buffer.from([0, 1, 254, 255]), at, JSON.stringify({ a: [1, 'x'] })])
  const [row] = await db.query<{ id: number; b: Uint8Array; at: Date; j: unknown }>('SELECT * FROM t')
  t.equal(row?.id, 1)
  t.ok(row?.b instanceof Uint8Array, 'bytea is bytes')
  t.same([...(row?.b ?? [])], [0, 1, 254, 255])
  t.ok(row?.at instanceof Date, 'timestamptz is a Date')
  t.equal(row?.at.toISOString(), at.toISOString())
  t.same(row?.j, { a: [1, 'x'] })

  const err = await rejection(db.query('INSERT INTO t (id) VALUES (1)'))
  t.equal(sqlState(err), UNIQUE_VIOLATION, 'the SQLSTATE is kept')
  t.equal((err as { constraint?: string }).constraint, 't_pkey', "and the error's fields")
  t.match(err.message, /duplicate key value violates unique constraint "t_pkey"/)

  const uncloneable = await rejection(db.query('SELECT $1::text AS v', [() => 'x']))
  t.equal(uncloneable.name, 'DataCloneError', 'a parameter that cannot cross the thread is refused at once')

  const syntax = await rejection(db.query('SELEC 1'))
  t.equal(sqlState(syntax), '42601')
  t.same(await db.query('SELECT 1 AS one'), [{ one: 1 }], 'the store goes on after errors')
})

t.test('transactions commit, roll back, and run one at a time', async (t) => {
  const db = await memoryDb()
  t.teardown(() => db.close())
  await db.exec('CREATE TABLE c (n int NOT NULL); INSERT INTO c VALUES (0)')

  t.equal(await db.transaction(async (tx) => (await tx.query<{ n: number }>('UPDATE c SET n = n + 1 RETURNING n'))[0]?.n), 1, 'the value fn returned')
  const boom = await rejection(
    db.transaction(async (tx) => {
      await tx.query('UPDATE c SET n = n + 100')
      throw new Error('boom')
    }),
  )
  t.equal(boom.message, 'boom', "fn's own error comes back")
  const failed = await rejection(
    db.transaction(async (tx) => {
      await tx.query('UPDATE c SET n = n + 100')
      await tx.query('SELECT * FROM no_such_table')
    }),
  )
  t.equal(sqlState(failed), '42P01')
  t.same(await db.query('SELECT n FROM c'), [{ n: 1 }], 'neither rolled-back change is there')

  // Read, wait, write: interleaved transactions would lose increments.
  await Promise.all(
    Array.from({ length: 10 }, () =>
      db.transaction(async (tx) => {
        const n = (await tx.query<{ n: number }>('SELECT n FROM c'))[0]?.n as number
        await new Promise((r) => setTimeout(r, 2))
        await tx.query('UPDATE c SET n = $1', [n + 1])
      }),
    ),
  )
  t.same(await db.query('SELECT n FROM c'), [{ n: 11 }], 'ten transactions, none lost')
})

t.test('a query does not stop the calling thread', async (t) => {
  const db = await memoryDb()
  t.teardown(() => db.close())
  let ticks = 0
  const timer = setInterval(() => ticks++, 10)
  await db.query('SELECT pg_sleep(1)')
  clearInterval(timer)
  // On the calling thread the one-second query would have let no tick run at all.
  t.ok(ticks >= 20, `the event loop ran during the query (${ticks} ticks of 10 ms)`)
})

t.test('a closed store refuses calls instead of leaving them waiting; the data directory is released', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-embedded-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  // As systemd's StateDirectory or an operator's mkdir leaves it.
  chmodSync(dir, 0o755)
  const db = await openDb({ dataDir: dir })
  // Before (found by a review): PGlite's files, 0666, in a folder of 0755: every local user could
  // change or destroy the catalogs, pg_control and the WAL.
  t.equal(statSync(join(dir, 'pgdata')).mode & 0o777, 0o700, "PGlite's folder is its owner's only")
  await db.exec('CREATE TABLE kept (v text); INSERT INTO kept VALUES ($$written$$)')
  await db.close()
  const err = await rejection(db.query('SELECT 1'))
  t.equal((err as { code?: string }).code, 'store_unavailable')
  // The same directory opens again, with what was written; a folder an earlier keygate left open is closed.
  chmodSync(join(dir, 'pgdata'), 0o755)
  const again = await openDb({ dataDir: dir })
  t.teardown(() => again.close())
  t.same(await again.query('SELECT v FROM kept'), [{ v: 'written' }])
  t.equal(statSync(join(dir, 'pgdata')).mode & 0o777, 0o700, 'tightened at the next open')
})

t.test('a store out of resources (SQLSTATE class 53: disk full, out of memory) is store_unavailable, on both stores', async (t) => {
  // Before (found by a review): a full disk under the embedded store answered 500 internal_error.
  await forEachStore(t, async (t, store) => {
    for (const code of ['53100', '53200']) {
      const err = await rejection(store.db.query(`DO $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '${code}'; END $$`))
      t.match(err, { code: 'store_unavailable', message: new RegExp(`out of resources \\(SQLSTATE ${code}\\): could not extend file`) }, code)
      const inTx = await rejection(store.db.transaction((tx) => tx.query(`DO $$ BEGIN RAISE EXCEPTION 'full' USING ERRCODE = '${code}'; END $$`)))
      t.match(inTx, { code: 'store_unavailable' }, `${code} in a transaction`)
    }
    t.equal(sqlState(await rejection(store.db.query(`DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '22012'; END $$`))), '22012', 'other errors stay as they are')
  })
})

t.test('a lock that cannot be taken for a reason of the file system says so, naming the folder', async (t) => {
  // Before: "unexpected error: EISDIR: illegal operation on a directory, read" (internal_error).
  const dir = mkdtempSync(join(tmpdir(), 'keygate-embedded-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  mkdirSync(join(dir, 'keygate.lock'))
  const err = await rejection(openDb({ dataDir: dir }))
  t.match(err, { code: 'store_unavailable', message: new RegExp(`^cannot lock the embedded store in ${dir}: `) })
})

t.test('a result nested too deeply to cross the thread is an error, not a call left waiting', async (t) => {
  const db = await memoryDb()
  t.teardown(() => db.close())
  const nested = (levels: number) => JSON.stringify({ a: JSON.parse('['.repeat(levels) + ']'.repeat(levels)) })
  // 4000 levels: V8 reads the message back recursively and runs out of stack; the reply was lost.
  const err = await rejection(db.query('SELECT $1::jsonb AS v', [nested(4000)]))
  t.match(err.message, /nests deeper than 1000 levels/)
  t.same(await db.query('SELECT 1 AS one'), [{ one: 1 }], 'the store goes on answering')
  const [row] = await db.query<{ v: { a: unknown } }>('SELECT $1::jsonb AS v', [nested(900)])
  t.ok(Array.isArray(row?.v.a), '900 levels cross')
})

t.test('stores started from one seed are each their own', async (t) => {
  const a = await memoryDb()
  t.teardown(() => a.close())
  await a.exec('CREATE TABLE only_in_a (v int)')
  const b = await memoryDb()
  t.teardown(() => b.close())
  t.same(await b.query("SELECT count(*)::int AS n FROM pg_tables WHERE tablename = 'only_in_a'"), [{ n: 0 }], 'a table made in one is not in the next')
  t.same(await a.query("SELECT count(*)::int AS n FROM pg_tables WHERE tablename = 'only_in_a'"), [{ n: 1 }])
})

t.test("a store a test closed is lent to the next test empty, and the first test's handle is refused", async (t) => {
  const a = await memoryDb()
  await migrate(a)
  const started = (await a.query<{ at: Date }>('SELECT pg_postmaster_start_time() AS at'))[0]?.at
  await a.exec("CREATE TABLE left_behind (v int); INSERT INTO left_behind VALUES (1); SET application_name = 'changed'")
  const open = a.transaction(async (tx) => {
    await new Promise((resolve) => setTimeout(resolve, 200))
    await tx.query('INSERT INTO left_behind VALUES (2)')
  })
  await a.close()
  await open
  t.equal((await rejection(a.query('SELECT 1'))).code, 'store_unavailable', 'the closed handle refuses calls')
  const b = await memoryDb()
  t.teardown(() => b.close())
  t.same((await b.query<{ at: Date }>('SELECT pg_postmaster_start_time() AS at'))[0]?.at, started, 'the same PGlite, lent again')
  t.same(await b.query("SELECT count(*)::int AS n FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"), [{ n: 0 }], 'nothing of the last test, not even what its open transaction wrote')
  t.same(await b.query('SHOW application_name'), [{ application_name: '' }], 'nor its session settings')
  // Every migration applied here, and the tables it made empty: a count(*) has one row whatever
  // the table holds, so its length said only that api_keys was there (found by a review).
  t.same(await migrate(b), readMigrations().map((m) => m.name), 'and it migrates from nothing: every migration applied')
  t.same(await b.query('SELECT count(*)::int AS n FROM api_keys'), [{ n: 0 }], 'its key table made empty')
})

t.test("a short command's store starts with 16 MB of shared buffers; serve's has store.embedded_shared_buffers_mb, by default PostgreSQL's 128 MB", async (t) => {
  const root = mkdtempSync(join(tmpdir(), 'keygate-buffers-'))
  t.teardown(() => rmSync(root, { recursive: true, force: true }))
  // Migrated already: the first openRuntime would otherwise apply the migrations, which this
  // test is not about (test/migrate.test.ts is).
  const dir = await seedDataDir(join(root, 'store'), { migrated: true })
  const buffers = async (shortLived: boolean, env: Record<string, string> = {}) => {
    const runtime = await openRuntime(loadConfig({ env: { KEYGATE_DATA_DIR: dir, KEYGATE_ENCRYPTION_KEY: TEST_ENCRYPTION_KEY.toString('base64'), ...env } }), silentLogger, { shortLived })
    try {
      return (await runtime.db.query<{ shared_buffers: string }>('SHOW shared_buffers'))[0]?.shared_buffers
    } finally {
      await runtime.close()
    }
  }
  t.equal(await buffers(true), '16MB', 'the CLI: a few queries never fill more')
  t.equal(await buffers(false), '128MB', 'serve: the default')
  t.equal(await buffers(false, { KEYGATE_EMBEDDED_SHARED_BUFFERS_MB: '24' }), '24MB', 'serve: as configured')
  t.equal(await buffers(false, { KEYGATE_EMBEDDED_SHARED_BUFFERS_MB: '1024' }), '1GB', 'the largest allowed starts')
  t.equal(await buffers(true, { KEYGATE_EMBEDDED_SHARED_BUFFERS_MB: '64' }), '16MB', 'the same folder, opened short again, whatever is configured')
  t.throws(() => loadConfig({ env: { KEYGATE_EMBEDDED_SHARED_BUFFERS_MB: '8' } }), /store\.embedded_shared_buffers_mb/, 'less than 16 is refused by name')
})
