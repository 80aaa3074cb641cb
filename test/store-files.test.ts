// The embedded store's files and folders, from a review of them against real processes: who may
// open a data folder, files that must appear whole, and how a file-system error reads.
import t from 'tap'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { Test } from 'tap'
import { loadAuditCipher } from '../core/audit.ts'
import { openDb } from '../core/db.ts'
import { EMSCRIPTEN_ERRNO, fileSystemErrorWords } from '../core/errors.ts'
import { childEnv, outcome, spawnClean, type CliResult } from './helpers/cli.ts'
import { rejection } from './helpers/stores.ts'

function tempDir(t: Pick<Test, 'teardown'>): string {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-store-files-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/**
 * Runs `script` (an ES module, given core/'s folder as `core`) in a child process whose file
 * size limit is 0 (`ulimit -f 0`): every write to a file fails with EFBIG, as one on a full disk
 * fails with ENOSPC. Its output goes to pipes, which the limit does not cover.
 */
function withNoFileSpace(script: string): Promise<CliResult> {
  const core = fileURLToPath(new URL('../core/', import.meta.url))
  const child = spawnClean('sh', ['-c', 'ulimit -f 0 && exec "$0" --input-type=module -e "$1"', process.execPath, `const core = ${JSON.stringify(core)};\n${script}`], { env: childEnv() })
  return outcome(child, ['(a script with no file space)'])
}

t.test('a generated encryption key whose write fails leaves no file, and the next start generates one', async (t) => {
  const dir = tempDir(t)
  const failed = await withNoFileSpace(`
    const { loadAuditCipher } = await import(core + 'audit.ts')
    try {
      loadAuditCipher({ storeKind: 'embedded', dataDir: ${JSON.stringify(dir)} })
      console.log(JSON.stringify({ ok: true }))
    } catch (err) {
      console.log(JSON.stringify({ code: err.code, message: err.message }))
    }`)
  t.equal(failed.code, 0, failed.stderr)
  t.same(JSON.parse(failed.stdout), { code: 'config_invalid', message: `${join(dir, 'encryption.key')} cannot be created: the file size limit was reached` })
  t.same(readdirSync(dir), [], 'no encryption.key, and no file of the attempt, is left')
  // Before, an empty encryption.key was left, and every start failed: "does not hold 32 bytes in base64".
  const cipher = loadAuditCipher({ storeKind: 'embedded', dataDir: dir })
  t.equal(Buffer.from(readFileSync(join(dir, 'encryption.key'), 'utf8').trim(), 'base64').length, 32)
  t.ok(cipher.currentKeyId)
  t.same(readdirSync(dir), ['encryption.key'])

  // Processes creating it at once: of the links into place one wins, and the others read its key.
  const raced = tempDir(t)
  const script = `const { loadAuditCipher } = await import(${JSON.stringify(new URL('../core/audit.ts', import.meta.url).href)}); console.log(loadAuditCipher({ storeKind: 'embedded', dataDir: ${JSON.stringify(raced)} }).currentKeyId)`
  const runs = await Promise.all([0, 1, 2].map(() => outcome(spawnClean(process.execPath, ['--input-type=module', '-e', script], { env: childEnv() }), ['(a script creating the key)'])))
  const ids = runs.map((r) => r.stdout.trim())
  t.same(runs.map((r) => r.code), [0, 0, 0], runs.map((r) => r.stderr).join(''))
  t.equal(new Set(ids).size, 1, 'every process has the same key')
  t.same(readdirSync(raced), ['encryption.key'], 'and no file of theirs is left beside it')
})

t.test("the lock's own file is removed when its write fails", async (t) => {
  const dir = tempDir(t)
  const failed = await withNoFileSpace(`
    const { openDb } = await import(core + 'db.ts')
    try {
      await (await openDb({ dataDir: ${JSON.stringify(dir)} })).close()
      console.log(JSON.stringify({ ok: true }))
    } catch (err) {
      console.log(JSON.stringify({ code: err.code, message: err.message }))
    }`)
  t.equal(failed.code, 0, failed.stderr)
  t.same(JSON.parse(failed.stdout), { code: 'store_unavailable', message: `cannot lock the embedded store in ${dir}: the file size limit was reached` })
  t.same(readdirSync(dir), [], 'no keygate.lock.<pid>.<hex> is left behind')
})

t.test("Emscripten's errno numbers, in words", async (t) => {
  // The table PGlite's file system numbers its errors by (Emscripten's, not Linux's).
  const pglite = readFileSync(new URL('../node_modules/@electric-sql/pglite/dist/pglite.js', import.meta.url), 'utf8')
  const literal = /ERRNO_CODES=\{([^}]*)\}/.exec(pglite)?.[1]
  t.ok(literal, "PGlite's ERRNO_CODES is found")
  const table = new Map((literal ?? '').split(',').map((pair) => pair.split(':') as [string, string]).map(([code, n]) => [code, Number(n)]))
  for (const [errno, code] of Object.entries(EMSCRIPTEN_ERRNO)) t.equal(table.get(code), Number(errno), `${code} is ${errno}`)

  t.equal(fileSystemErrorWords(51), 'file system error ENOSPC (no space left on the device)', 'a full disk, without the hint of a file in the way')
  t.equal(fileSystemErrorWords(2), 'file system error EACCES (permission denied)')
  t.equal(fileSystemErrorWords(69), 'file system error EROFS (the file system is read-only)')
  t.equal(fileSystemErrorWords(44), 'file system error ENOENT (a file or folder is missing)')
  t.equal(fileSystemErrorWords(54), 'file system error ENOTDIR (a file is in the way; is something in the data folder not what the store expects, such as a file where a folder should be?)')
  t.equal(fileSystemErrorWords(31), 'file system error EISDIR (it is a folder; is something in the data folder not what the store expects, such as a file where a folder should be?)')
  t.equal(fileSystemErrorWords(1), "file system error errno 1 (in Emscripten's numbering)", 'a number not in the table stays a number')
})

t.test('a file where PGlite makes a folder, in a new store: ENOTDIR in words, with the hint', async (t) => {
  // initdb runs here (some 6 s of CPU): what PGlite throws as a bare {errno} comes from its file
  // system while it makes a store.
  const dir = tempDir(t)
  mkdirSync(join(dir, 'pgdata'), { mode: 0o700 })
  writeFileSync(join(dir, 'pgdata', 'global'), 'not a folder')
  const err = await rejection(openDb({ dataDir: dir }))
  t.equal(err.code, 'store_unavailable')
  t.equal(err.message, `cannot open the embedded store in ${dir}: file system error ENOTDIR (a file is in the way; is something in the data folder not what the store expects, such as a file where a folder should be?)`)
  t.notOk(existsSync(join(dir, 'keygate.lock')), 'the lock is released')
})
