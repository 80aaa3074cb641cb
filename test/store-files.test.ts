// The embedded store's files and folders, from a review of them against real processes: who may
// open a data folder, files that must appear whole, and how a file-system error reads.
import t from 'tap'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { openDb } from '../core/db.ts'
import { EMSCRIPTEN_ERRNO, fileSystemErrorWords } from '../core/errors.ts'
import { rejection } from './helpers/stores.ts'

function tempDir(t: Pick<Test, 'teardown'>): string {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-store-files-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

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
