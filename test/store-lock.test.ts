// The embedded store's lock (core/db.ts): taken over from a process that is gone, refused while
// its owner runs, never left without its pid, and released only by the process whose pid it holds.
import t from 'tap'
import { spawn } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { openDb } from '../core/db.ts'
import { seedDataDir } from './helpers/pglite-template.ts'

/** A process that runs until the test ends. */
function liveProcess(t: { teardown(fn: () => void): void }): number {
  const child = spawn('sleep', ['600'], { stdio: 'ignore' })
  t.teardown(() => child.kill())
  return child.pid as number
}

/** The pid of a process that has exited. */
async function deadPid(): Promise<number> {
  const child = spawn('true', { stdio: 'ignore' })
  await new Promise((resolve) => child.once('exit', resolve))
  return child.pid as number
}

t.test('a stale lock is taken over, a live one refuses, and a process removes only its own', async (t) => {
  const dir = await seedDataDir(mkdtempSync(join(tmpdir(), 'keygate-lock-')))
  const lock = join(dir, 'keygate.lock')
  writeFileSync(lock, String(await deadPid()))
  const db = await openDb({ dataDir: dir })
  t.equal(readFileSync(lock, 'utf8'), String(process.pid), "the lock of a process that is gone is taken over, with this process's pid in it")
  t.same(readdirSync(dir).filter((f) => f.startsWith('keygate.lock')), ['keygate.lock'], 'no file of the taking-over is left beside it')

  // Another process took the lock over meanwhile (say, one that judged this process gone): closing must not remove its lock.
  const other = liveProcess(t)
  writeFileSync(join(dir, 'other'), String(other))
  renameSync(join(dir, 'other'), lock)
  await db.close()
  t.equal(readFileSync(lock, 'utf8'), String(other), "closing leaves another process's lock in place")

  const refused = await openDb({ dataDir: dir }).then(
    async (d) => {
      await d.close()
      return 'opened'
    },
    (err: { code?: string }) => err.code,
  )
  t.equal(refused, 'store_locked', 'a lock whose process runs is refused')
  t.equal(readFileSync(lock, 'utf8'), String(other), 'and left as it is')
})
