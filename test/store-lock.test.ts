// The embedded store's lock (core/db.ts): taken over from a process that is gone, refused while
// its owner runs, never left without its pid, and released only by the process whose pid it holds.
import t from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import net from 'node:net'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { openDb, processIdentity } from '../core/db.ts'
import { seedDataDir } from './helpers/pglite-template.ts'

/** A store of its own for the test, removed when the test ends (each is a PGlite folder of about 40 MB). */
async function storeFolder(t: { teardown(fn: () => void): void }): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-lock-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return seedDataDir(dir)
}

/** What opening the store at `dir` comes to: 'opened' (and closed again), or the refusal's code and message. */
const opens = async (dir: string): Promise<string> =>
  openDb({ dataDir: dir }).then(
    async (d) => {
      await d.close()
      return 'opened'
    },
    (err: { code?: string; message?: string }) => `${err.code}: ${err.message}`,
  )

/** A process that runs until the test ends. */
function liveProcess(t: { teardown(fn: () => void): void }): number {
  const child = spawn('sleep', ['600'], { stdio: 'ignore' })
  t.teardown(() => child.kill())
  return child.pid as number
}

/** A zombie's pid: a process that has exited, whose parent (sleeping until the test ends) never reads its status. */
async function zombiePid(t: { teardown(fn: () => void): void }): Promise<number> {
  // The child ends after the shell has become `sleep 600`, which never waits for it (one that ended
  // before could be reaped by the shell itself).
  const parent = spawn('sh', ['-c', 'sleep 0.3 & echo $!; exec sleep 600'], { stdio: ['ignore', 'pipe', 'ignore'] })
  t.teardown(() => parent.kill('SIGKILL'))
  const pid = Number(await new Promise<string>((resolve) => parent.stdout.once('data', (d: Buffer) => resolve(d.toString()))))
  for (let i = 0; i < 200 && !/\) Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8')); i++) await new Promise((r) => setTimeout(r, 10))
  return pid
}

/** The pid of a process that has exited. */
async function deadPid(): Promise<number> {
  const child = spawn('true', { stdio: 'ignore' })
  await new Promise((resolve) => child.once('exit', resolve))
  return child.pid as number
}

t.test('a stale lock is taken over, a live one refuses, and a process removes only its own', async (t) => {
  const dir = await storeFolder(t)
  const lock = join(dir, 'keygate.lock')
  writeFileSync(lock, String(await deadPid()))
  const db = await openDb({ dataDir: dir })
  t.equal(readFileSync(lock, 'utf8'), String(process.pid), "the lock of a process that is gone is taken over, with this process's pid in it")
  t.same(readdirSync(dir).filter((f) => f.startsWith('keygate.lock')).sort(), ['keygate.lock', 'keygate.lock.owner', 'keygate.lock.sock'], 'no file of the taking-over is left beside it')
  t.equal(readFileSync(`${lock}.owner`, 'utf8'), `${processIdentity(process.pid)} sock`, "the owner file names this process (pid, boot, machine, namespaces, start) and that it listens on keygate.lock.sock")

  // Another process took the lock over meanwhile (say, one that judged this process gone): closing must not remove its lock.
  const other = liveProcess(t)
  writeFileSync(join(dir, 'other'), String(other))
  renameSync(join(dir, 'other'), lock)
  writeFileSync(`${lock}.owner`, `${processIdentity(other)} -`)
  await db.close()
  t.equal(readFileSync(lock, 'utf8'), String(other), "closing leaves another process's lock in place")
  t.equal(readFileSync(`${lock}.owner`, 'utf8'), `${processIdentity(other)} -`, 'and its owner file')

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
  const identity = `${processIdentity(live) as string} -`
  t.match(identity, new RegExp(`^${live} [0-9a-f-]+ ([0-9a-f]{32}|-) pid:\\[\\d+\\] (time:\\[\\d+\\]|-) \\d+ -$`), "a process's identity: pid, boot id, machine id, pid and time namespaces, start in ticks")
  const [, boot, machine, pidNs, timeNs, start] = identity.split(' ') as [string, string, string, string, string, string, string]
  const otherBoot = boot.replace(/^./, (c) => (c === 'a' ? 'b' : 'a'))
  const otherMachine = 'f'.repeat(32)
  const bootedAt = Number(/^btime (\d+)$/m.exec(readFileSync('/proc/stat', 'utf8'))?.[1])
  const lockWith = async (owner: string | undefined, lockTime?: number) => {
    const dir = await storeFolder(t)
    const lock = join(dir, 'keygate.lock')
    writeFileSync(lock, String(live))
    if (lockTime !== undefined) utimesSync(lock, lockTime, lockTime)
    if (owner !== undefined) writeFileSync(`${lock}.owner`, owner)
    return { dir, lock }
  }
  const cases: Array<[string, string, number | undefined]> = [
    ['of a process in this boot and pid namespace that started at another tick', `${live} ${boot} ${machine} ${pidNs} ${timeNs} ${Number(start) + 1} -`, undefined],
  ]
  // Needs this machine's id: without one, an earlier boot cannot be told from another machine's.
  if (machine === '-') t.comment('this machine has no /etc/machine-id: a lock of an earlier boot is judged by its pid, and that case is not run')
  else cases.push(['written on this machine before this boot', `${live} ${otherBoot} ${machine} ${pidNs} ${timeNs} ${start} -`, bootedAt - 3600])
  for (const [what, owner, lockTime] of cases) {
    const { dir, lock } = await lockWith(owner, lockTime)
    const db = await openDb({ dataDir: dir })
    t.equal(readFileSync(lock, 'utf8'), String(process.pid), `a lock ${what}, its pid now another process's, is taken over`)
    t.equal(readFileSync(`${lock}.owner`, 'utf8'), `${processIdentity(process.pid)} sock`, 'the owner file is this process now')
    await db.close()
    t.same(readdirSync(dir).filter((f) => f.startsWith('keygate.lock')), [], 'both files are removed on close')
  }
  // The owner's own identity, or none (a lock of an earlier version), or one naming another pid
  // (the owner has not written its own yet), or one this process cannot judge: the lock stands
  // while its pid runs.
  for (const [what, owner, lockTime] of [
    ['whose owner file names its process', identity, undefined],
    ['without an owner file', undefined, undefined],
    ['whose owner file names another pid', `${live + 1} ${otherBoot} ${machine} ${pidNs} ${timeNs} 1 -`, undefined],
    // Another kernel's (a virtual machine sharing the folder), its lock younger than this boot, or older (found by a review).
    ['of another boot id, written since this boot', `${live} ${otherBoot} ${machine} ${pidNs} ${timeNs} ${start} -`, undefined],
    ["of another machine's boot, older than this boot", `${live} ${otherBoot} ${otherMachine} ${pidNs} ${timeNs} ${start} -`, bootedAt - 3600],
    // A container's: its pids are other processes here.
    ['of another pid namespace', `${live} ${boot} ${machine} pid:[1] ${timeNs} ${Number(start) + 1} -`, undefined],
    // Another time namespace shifts the start ticks read (found by a review: a live owner judged gone).
    ['of another time namespace', `${live} ${boot} ${machine} ${pidNs} time:[1] ${Number(start) + 86_400} -`, undefined],
    ['of an owner file in the format of 5eee258', `${live} ${boot} ${pidNs} ${Number(start) + 1}`, undefined],
  ] as const) {
    const { lock, dir } = await lockWith(owner, lockTime)
    t.match(await opens(dir), /^store_locked: /, `a lock ${what} is refused while its pid runs`)
    t.equal(readFileSync(lock, 'utf8'), String(live), 'and left as it is')
    if (owner !== undefined) t.equal(readFileSync(`${lock}.owner`, 'utf8'), owner, 'its owner file too')
  }
  // An owner file written for another lock (found by an upgrade review): a gone keygate's, beside
  // the lock a keygate of a version before the owner file took over, under the same pid (a
  // container's keygate is pid 1 each time), leaving the file. Before, the file's other start tick
  // said the lock was left by a gone process, and a CLI took it over from the running server.
  {
    const { dir, lock } = await lockWith(`${live} ${boot} ${machine} ${pidNs} ${timeNs} ${Number(start) + 1} sock`)
    // Written before the lock below (a second earlier, as a clock of whole seconds may read it).
    const before = Date.now() / 1000 - 1
    utimesSync(`${lock}.owner`, before, before)
    // The earlier version's takeover: a new lock file put in place of the old (its inode may well
    // be the old one's, which ext4 gives again at once).
    writeFileSync(join(dir, 'taking'), String(live))
    renameSync(join(dir, 'taking'), lock)
    await staleSocket(`${lock}.sock`)
    t.match(await opens(dir), /^store_locked: /, "an owner file older than the lock says nothing of its owner being gone: judged by its pid, which runs, and refused")
    t.equal(readFileSync(lock, 'utf8'), String(live), 'and left as it is')
  }
  // What the message says where the owner file names another pid namespace: that, not that the
  // owner is likely gone (found by a review).
  const { dir: nsDir } = await lockWith(`${live} ${boot} ${machine} pid:[1] ${timeNs} ${start} -`)
  // A zombie's lock (found by an upgrade review): it has exited, and waits only for its parent to
  // read its status; before, an init that reaps late kept the store store_locked until it did.
  const zombie = await zombiePid(t)
  const zombieDir = await storeFolder(t)
  writeFileSync(join(zombieDir, 'keygate.lock'), String(zombie))
  t.equal(await opens(zombieDir), 'opened', `a lock of a zombie (pid ${zombie}) is taken over`)
  t.match(await opens(nsDir), /in use by process \d+ of another pid namespace \(a container sharing the data folder; its pid here is another process\): stop that keygate; if it is gone, remove .*keygate\.lock and .*keygate\.lock\.owner$/)
})

t.test('an owner file or lock that is no small regular file is never read as one', async (t) => {
  // Found by a review: an owner file linked to /dev/zero grew a command to 13.8 GB; a FIFO hung it.
  const live = liveProcess(t)
  for (const [what, plant] of [
    ['a symbolic link to /dev/zero', (path: string) => symlinkSync('/dev/zero', path)],
    // A socket cannot be opened at all (ENXIO): it was the bare errno text (found by a review).
    ['a socket', (path: string) => staleSocketSync(path)],
    ['a folder', (path: string) => mkdirSync(path)],
    ['a file of 1 MB', (path: string) => writeFileSync(path, 'x'.repeat(1_000_000))],
  ] as const) {
    const dir = await storeFolder(t)
    const lock = join(dir, 'keygate.lock')
    writeFileSync(lock, String(live))
    plant(`${lock}.owner`)
    const refused = await openDb({ dataDir: dir }).then(
      async (d) => {
        await d.close()
        return 'opened'
      },
      (err: { code?: string }) => err.code,
    )
    t.equal(refused, 'store_locked', `an owner file that is ${what}: the lock is judged by its pid alone`)
    const lockDir = await storeFolder(t)
    plant(join(lockDir, 'keygate.lock'))
    const odd = await openDb({ dataDir: lockDir }).then(
      async (d) => {
        await d.close()
        return 'opened'
      },
      (err: { code?: string; message?: string }) => `${err.code}: ${err.message}`,
    )
    t.match(odd, /^store_unavailable: cannot lock the embedded store in .*: .*keygate\.lock is not a lock keygate writes/, `a lock that is ${what}: refused, saying so`)
  }
})

/** A socket at `path` that answers until the test ends. */
async function answeringSocket(t: { teardown(fn: () => void): void }, path: string): Promise<void> {
  const server = net.createServer((socket) => socket.destroy())
  await new Promise<void>((resolve) => server.listen(path, resolve))
  t.teardown(() => server.close())
}

/** A socket file at `path`, made by a process that has ended. */
function staleSocketSync(path: string): void {
  spawnSync(process.execPath, ['-e', "const s = require('node:net').createServer().listen(process.argv[1], () => process.kill(process.pid, 'SIGKILL'))", path])
}

/** A socket file at `path` whose process was killed: it refuses every connection. */
async function staleSocket(path: string): Promise<void> {
  const child = spawn(process.execPath, ['-e', "require('node:net').createServer().listen(process.argv[1], () => process.stdout.write('up'))", path], { stdio: ['ignore', 'pipe', 'ignore'] })
  await new Promise((resolve) => child.stdout.once('data', resolve))
  child.kill('SIGKILL')
  await new Promise((resolve) => child.once('exit', resolve))
}

t.test("the owner's socket tells whether it runs, in any pid namespace: two containers sharing a data folder never both open it", async (t) => {
  // Found by a review: a container's keygate has a pid that means another process here, often
  // this process's own (pid 1) or none at all, and the lock was taken over: both opened the store.
  const mine = processIdentity(process.pid) as string
  const [, boot, machine, , timeNs, start] = mine.split(' ') as [string, string, string, string, string, string]
  for (const [what, pid, listens] of [
    ["this process's own pid", process.pid, true],
    ['a pid no process has here', await deadPid(), true],
    // One that could not listen (a data folder path too long for a socket; found by a review):
    // it cannot be asked, and holds the store.
    ["this process's own pid, not listening", process.pid, false],
  ] as const) {
    const dir = await storeFolder(t)
    const lock = join(dir, 'keygate.lock')
    writeFileSync(lock, String(pid))
    writeFileSync(`${lock}.owner`, `${pid} ${boot} ${machine} pid:[1] ${timeNs} ${start} ${listens ? 'sock' : '-'}`)
    if (listens) await answeringSocket(t, `${lock}.sock`)
    t.match(await opens(dir), /^store_locked: .* of another pid namespace \(a container sharing the data folder/, `a container's live keygate whose pid is ${what}: refused`)
    t.equal(readFileSync(lock, 'utf8'), String(pid), 'its lock left as it is')
  }
  // Its lock rewritten since its owner file (a copy put in its place, by a sync tool): the socket
  // still speaks for a live owner (found by a review: with the owner file set aside for another
  // lock, a container's keygate of pid 1 took a live one's store over).
  {
    const dir = await storeFolder(t)
    const lock = join(dir, 'keygate.lock')
    writeFileSync(lock, String(process.pid))
    writeFileSync(`${lock}.owner`, `${process.pid} ${boot} ${machine} pid:[1] ${timeNs} ${start} sock`)
    const before = Date.now() / 1000 - 1
    utimesSync(`${lock}.owner`, before, before)
    writeFileSync(join(dir, 'copy'), String(process.pid))
    renameSync(join(dir, 'copy'), lock)
    await answeringSocket(t, `${lock}.sock`)
    t.match(await opens(dir), /^store_locked: .* of another pid namespace/, "a container's live keygate whose lock was rewritten: its socket answers, refused")
  }
  // Its socket refusing (the owner is gone, its socket file left): taken over, whatever runs under its pid.
  const live = liveProcess(t)
  const dir = await storeFolder(t)
  const lock = join(dir, 'keygate.lock')
  writeFileSync(lock, String(live))
  writeFileSync(`${lock}.owner`, `${processIdentity(live)} sock`)
  await staleSocket(`${lock}.sock`)
  t.equal(await opens(dir), 'opened', "an owner file naming a live process whose socket refuses: the owner is gone (it would answer), taken over")
  t.same(readdirSync(dir).filter((f) => f.startsWith('keygate.lock')), [], 'and every file of the lock removed on close')
  // An owner that says it does not listen: a socket left there refusing says nothing of it.
  const quiet = await storeFolder(t)
  const quietLock = join(quiet, 'keygate.lock')
  writeFileSync(quietLock, String(live))
  writeFileSync(`${quietLock}.owner`, `${processIdentity(live)} -`)
  await staleSocket(`${quietLock}.sock`)
  t.match(await opens(quiet), /^store_locked: /, 'an owner that does not listen is judged by its pid: refused while it runs')
})

t.test('one process at a time takes the lock: another waits while keygate.lock.taking is there, and a stale marker is removed', async (t) => {
  // Found by a review: a lock linked and its owner file not yet written read as an earlier
  // version's, and three processes taking over one stale lock could leave two holding it.
  const dir = await storeFolder(t)
  const marker = join(dir, 'keygate.lock.taking')
  writeFileSync(marker, '12345')
  let settled = false
  const opening = opens(dir).then((r) => {
    settled = true
    return r
  })
  await new Promise((resolve) => setTimeout(resolve, 400))
  t.notOk(settled, 'it waits while another process takes the lock')
  rmSync(marker)
  t.equal(await opening, 'opened', 'and takes it once that one is done')
  t.same(readdirSync(dir).filter((f) => f.startsWith('keygate.lock')), [], 'every file of the lock removed on close, the marker too')
  // Left by a process that died taking the lock (it is held for milliseconds).
  writeFileSync(marker, '12345')
  const minuteAgo = Date.now() / 1000 - 60
  utimesSync(marker, minuteAgo, minuteAgo)
  t.equal(await opens(dir), 'opened', 'a marker a minute old is a dead process\'s: removed')
})
