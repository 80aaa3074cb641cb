// The key lifecycle of the `keygate` command on PostgreSQL as real processes: migrate, every
// api-key command, no plaintext key in pg_dump's output or any captured log.
import t from 'tap'
import { execFileSync } from 'node:child_process'
import { runCli } from './helpers/cli.ts'
import { ENCRYPTION_KEY, isolated, lifecycle, noPlaintextInOutput, plaintexts, tempDir } from './helpers/cli-lifecycle.ts'
import { freshDatabase } from './helpers/stores.ts'

t.test('key lifecycle on PostgreSQL', async (t) => {
  const url = await freshDatabase(t)
  const cwd = tempDir()
  const missing = await runCli(['api-key', 'list'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.equal(missing.code, 1, 'PostgreSQL without an encryption key is refused')
  t.match(missing.stderr, /KEYGATE_ENCRYPTION_KEY is required with DATABASE_URL/)

  const migrated = await runCli(['migrate', '--json'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.equal(migrated.code, 0, migrated.stderr)
  t.same(migrated.json().store, 'postgres')
  const again = await runCli(['migrate'], { cwd, env: isolated({ DATABASE_URL: url }) })
  t.match(again.stdout, /nothing to apply/)

  await lifecycle(t, { cwd, env: isolated({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY }) })

  const dump = execFileSync('pg_dump', ['--data-only', url], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 })
  t.match(dump, /demo-renamed/, 'the dump holds the stored rows')
  for (const p of plaintexts) t.notOk(dump.includes(p), 'no plaintext key in the PostgreSQL dump')

  const down = await runCli(['api-key', 'list'], { cwd, env: isolated({ DATABASE_URL: 'postgres://postgres@127.0.0.1:1/none', KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY }) })
  t.equal(down.code, 1)
  t.match(down.stderr, /cannot reach PostgreSQL at 127\.0\.0\.1:1/)
})

// (On PostgreSQL, with migrations applied by `keygate migrate`, the commands log nothing at all.)
t.test('no captured log or error output holds a plaintext key', async (t) => noPlaintextInOutput(t, { logLines: false }))
