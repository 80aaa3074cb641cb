// The embedded store's lock (core/db.ts): taken over from a process that is gone, refused while
// its owner runs, never left without its pid, and released only by the process whose pid it holds.
import t from 'tap'
import { spawn } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, renameSync, utimesSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { openDb, processIdentity } from '../core/db.ts'
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
  t.same(readdirSync(dir).filter((f) => f.startsWith('keygate.lock')).sort(), ['keygate.lock', 'keygate.lock.owner'], 'no file of the taking-over is left beside it')
  t.equal(readFileSync(`${lock}.owner`, 'utf8'), processIdentity(process.pid), "the owner file names this process: its pid, the boot's id and its start")

  // Another process took the lock over meanwhile (say, one that judged this process gone): closing must not remove its lock.
  const other = liveProcess(t)
  writeFileSync(join(dir, 'other'), String(other))
  renameSync(join(dir, 'other'), lock)
  writeFileSync(`${lock}.owner`, processIdentity(other) as string)
  await db.close()
  t.equal(readFileSync(lock, 'utf8'), String(other), "closing leaves another process's lock in place")
  t.equal(readFileSync(`${lock}.owner`, 'utf8'), processIdentity(other), 'and its owner file')

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

t.test('a lock whose pid another process has taken since (after a reboot, or a SIGKILL) is taken over; its owner file says so', async (t) => {
  // Before: the lock held a pid alone, and a live process of that pid (after an unclean reboot,
  // services start in the same order and take the same pids) held the store for ever: every
  // start was store_locked until someone removed the file.
  const live = liveProcess(t)
  const identity = processIdentity(live) as string
  t.match(identity, new RegExp(`^${live} [0-9a-f-]+ pid:\\[\\d+\\] \\d+$`), "a process's identity: pid, boot id, pid namespace, start in ticks")
  const [, boot, ns, start] = identity.split(' ') as [string, string, string, string]
  const otherBoot = boot.replace(/^./, (c) => (c === 'a' ? 'b' : 'a'))
  const bootedAt = Number(/^btime (\d+)$/m.exec(readFileSync('/proc/stat', 'utf8'))?.[1])
  const lockWith = async (owner: string | undefined, lockTime?: number) => {
    const dir = await seedDataDir(mkdtempSync(join(tmpdir(), 'keygate-lock-')))
    const lock = join(dir, 'keygate.lock')
    writeFileSync(lock, String(live))
    if (lockTime !== undefined) utimesSync(lock, lockTime, lockTime)
    if (owner !== undefined) writeFileSync(`${lock}.owner`, owner)
    return { dir, lock }
  }
  for (const [what, owner, lockTime] of [
    ['written before this boot, in an earlier one', `${live} ${otherBoot} ${ns} ${start}`, bootedAt - 3600],
    ['of a process in this boot and pid namespace that started at another time', `${live} ${boot} ${ns} ${Number(start) + 1}`, undefined],
  ] as const) {
    const { dir, lock } = await lockWith(owner, lockTime)
    const db = await openDb({ dataDir: dir })
    t.equal(readFileSync(lock, 'utf8'), String(process.pid), `a lock ${what}, its pid now another process's, is taken over`)
    t.equal(readFileSync(`${lock}.owner`, 'utf8'), processIdentity(process.pid), 'the owner file is this process now')
    await db.close()
    t.same(readdirSync(dir).filter((f) => f.startsWith('keygate.lock')), [], 'both files are removed on close')
  }
  // The owner's own identity, or none (a lock of an earlier version), or one naming another pid
  // (the owner has not written its own yet), or one this process cannot judge: the lock stands
  // while its pid runs.
  for (const [what, owner] of [
    ['whose owner file names its process', identity],
    ['without an owner file', undefined],
    ['whose owner file names another pid', `${live + 1} ${otherBoot} ${ns} 1`],
    // Another kernel's (a virtual machine sharing the folder): its lock is younger than this boot.
    ['of another boot id, written since this boot', `${live} ${otherBoot} ${ns} ${start}`],
    // A container's: its pids are other processes here.
    ['of another pid namespace', `${live} ${boot} pid:[1] ${Number(start) + 1}`],
  ] as const) {
    const { lock, dir } = await lockWith(owner)
    const refused = await openDb({ dataDir: dir }).then(
      async (d) => {
        await d.close()
        return 'opened'
      },
      (err: { code?: string }) => err.code,
    )
    t.equal(refused, 'store_locked', `a lock ${what} is refused while its pid runs`)
    t.equal(readFileSync(lock, 'utf8'), String(live), 'and left as it is')
    if (owner !== undefined) t.equal(readFileSync(`${lock}.owner`, 'utf8'), owner, 'its owner file too')
  }
})
