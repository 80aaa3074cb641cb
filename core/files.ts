// Files that must appear whole or not at all: the embedded store's lock and its generated
// encryption key.
import { closeSync, fsyncSync, linkSync, openSync, renameSync, unlinkSync, writeSync } from 'node:fs'
import { randomBytes } from 'node:crypto'
import { dirname } from 'node:path'

/**
 * Writes `content` into a new file `path` (mode `mode`; EEXIST if it is there), flushed to the
 * disk when `sync`. A write that fails (a full disk, the file size limit) removes the file again:
 * before (found by a review), a failed write left an empty file behind, which a later start read
 * as a damaged key, or as a stray lock file.
 */
export function writeNewFile(path: string, content: string, mode: number, sync: boolean): void {
  const fd = openSync(path, 'wx', mode)
  try {
    const bytes = Buffer.from(content)
    for (let at = 0; at < bytes.length; ) at += writeSync(fd, bytes, at)
    if (sync) fsyncSync(fd)
  } catch (err) {
    closeSync(fd)
    removeQuietly(path)
    throw err
  }
  closeSync(fd)
}

/**
 * A file of this process's own beside `file`, for a content that is linked into place whole
 * (writeNewFile, then link()): no other process ever sees `file` empty or half written.
 */
export function ownTempName(file: string): string {
  return `${file}.${process.pid}.${randomBytes(4).toString('hex')}`
}

/**
 * Writes `content` to a file of this process's own beside `file` (mode `mode`), flushed, then
 * `place`s it (false: it was not placed), and flushes the folder so the new name survives a
 * crash. The own file is removed in every case.
 */
function throughOwnFile(file: string, content: string, mode: number, place: (temp: string) => boolean): boolean {
  const temp = ownTempName(file)
  writeNewFile(temp, content, mode, true)
  let placed: boolean
  try {
    placed = place(temp)
  } finally {
    removeQuietly(temp)
  }
  if (placed) syncFolder(dirname(file))
  return placed
}

/**
 * Creates `file` with `content` (mode `mode`) only if it is not there, and only whole: written to
 * a file of this process's own in the same folder, then hard-linked into place (a link fails with
 * EEXIST when the file exists, so of processes racing to create it exactly one wins). False when
 * `file` was there already (another process won); a failure leaves no `file` behind.
 */
export function createWhole(file: string, content: string, mode: number): boolean {
  return throughOwnFile(file, content, mode, (temp) => {
    try {
      linkSync(temp, file)
      return true
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false
      throw err
    }
  })
}

/**
 * Puts `content` in place of `file` (mode `mode`) whole: written to a file of this process's own
 * in the same folder, then renamed over `file`, which a reader sees as it was or as it is now,
 * never half written. For a file only this process may change (the embedded store's, under its
 * lock).
 */
export function replaceWhole(file: string, content: string, mode: number): void {
  throughOwnFile(file, content, mode, (temp) => {
    renameSync(temp, file)
    return true
  })
}

function removeQuietly(path: string): void {
  try {
    unlinkSync(path)
  } catch {}
}

/** Flushes a folder's entries to the disk, where the system allows it (not on Windows). */
function syncFolder(dir: string): void {
  let fd: number | undefined
  try {
    fd = openSync(dir, 'r')
    fsyncSync(fd)
  } catch {
    // A folder that cannot be opened or flushed: the name is still there until a crash.
  } finally {
    if (fd !== undefined) closeSync(fd)
  }
}
