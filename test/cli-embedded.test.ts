// The key lifecycle of the `keygate` command on the embedded store as real processes, and
// afterwards no plaintext key in the store files or any captured log. Apart from the rest of
// test/cli.test.ts so that it runs beside it: each command opens the embedded store, and the
// lifecycle alone took 235 s of a loaded suite, near tap's 300 s for a file. The first run of each
// command, an exit 1, an exit 2 and the last run are processes of their own; a command run again
// goes through the command line's entry in this process, on the same store (helpers/cli-lifecycle.ts).
import t from 'tap'
import { existsSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { folderBytes, runCli } from './helpers/cli.ts'
import { isolated, lifecycle, noPlaintextInOutput, plaintexts, tempDir } from './helpers/cli-lifecycle.ts'
import { seedDataDir } from './helpers/pglite-template.ts'
import { freePort } from './helpers/integrations.ts'

t.test('key lifecycle on the embedded store', async (t) => {
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'))
  await lifecycle(t, { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir }) })
  t.ok(statSync(join(dataDir, 'encryption.key')).mode & 0o600, 'an encryption key was generated into the data folder')
  t.equal(statSync(join(dataDir, 'encryption.key')).mode & 0o077, 0, 'readable by its owner only')
  t.notOk(existsSync(join(dataDir, 'keygate.lock')), 'the store lock is released on exit')

  const everything = folderBytes(dataDir)
  t.ok(everything.includes(Buffer.from('demo-renamed')), 'the data files hold the stored text (the scan below can see strings)')
  for (const p of plaintexts) t.notOk(everything.includes(Buffer.from(p)), 'no plaintext key in the embedded store files')
})

t.test('no captured log or error output holds a plaintext key', async (t) => noPlaintextInOutput(t, { logLines: true }))

// Before (found by a review): "Redis did not answer" whatever the reason, a refused connection too.
t.test('a change the CLI cannot publish because Redis refuses the connection is warned of with the reason', async (t) => {
  const cwd = tempDir()
  const dataDir = await seedDataDir(join(cwd, 'store'))
  const port = await freePort()
  const made = await runCli(['api-key', 'create', '--name', 'k', '--type', 'user'], { cwd, env: isolated({ KEYGATE_DATA_DIR: dataDir, REDIS_URL: `redis://127.0.0.1:${port}` }) })
  t.equal(made.code, 0, made.stderr)
  const warning = made.stderr.split('\n').filter((l) => l.includes('could not tell the gateways through Redis')).map((l) => JSON.parse(l) as { err: { message: string } })
  t.equal(warning.length, 1, 'warned once')
  t.equal(warning[0]?.err.message, `Redis cannot be reached: connect ECONNREFUSED 127.0.0.1:${port}`)
})
