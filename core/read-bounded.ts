// Reads a file whole, but never more than a bound: a file given by an operator may be huge by
// mistake, and a pipe or a device (/dev/zero) has no size to check first.
import { closeSync, fstatSync, openSync, readSync } from 'node:fs'

export type BoundedRead =
  | { bytes: Buffer }
  /** `size` as the file's size said it, or undefined when only reading it told (a pipe, a device, a file growing). */
  | { tooLarge: true; size: number | undefined }
  | { unreadable: NodeJS.ErrnoException }

/** The bytes of `file` when it holds at most `maxBytes`; otherwise whether it was too large or unreadable. */
export function readAtMost(file: string, maxBytes: number): BoundedRead {
  let fd: number | undefined
  try {
    fd = openSync(file, 'r')
    const size = fstatSync(fd).size
    if (size > maxBytes) return { tooLarge: true, size }
    // One byte more than allowed, to know a larger file by reading it.
    const bytes = Buffer.allocUnsafe(maxBytes + 1)
    let length = 0
    let n: number
    do {
      n = readSync(fd, bytes, length, bytes.length - length, null)
      length += n
    } while (n > 0 && length < bytes.length)
    return length > maxBytes ? { tooLarge: true, size: undefined } : { bytes: bytes.subarray(0, length) }
  } catch (err) {
    return { unreadable: err as NodeJS.ErrnoException }
  } finally {
    if (fd !== undefined) closeSync(fd)
  }
}
