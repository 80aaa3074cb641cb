// Reads a file whole, but never more than a bound: a file given by an operator may be huge by
// mistake, and a pipe or a device (/dev/zero) has no size to check first. And reads its bytes as
// UTF-8 text, strictly: decoded leniently, each byte that is not UTF-8 becomes U+FFFD, and the
// changed value is taken without a word.
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

/** Where a text stops being UTF-8: the byte offset, and the line and column (in characters) of the first bad byte. */
export interface Utf8Problem {
  /** The bytes are UTF-16: they start with its byte order mark, or (`bom` false) a character of it without one. */
  utf16: boolean
  bom?: boolean
  offset: number
  line: number
  col: number
}

/** Why the bytes of a problem with `utf16` are taken for UTF-16, in words (in parentheses). */
export function utf16Words(problem: Utf8Problem): string {
  return problem.bom === false ? '(a NUL byte beside its first character, as UTF-16 without a byte order mark has beside each ASCII one)' : '(it starts with a UTF-16 byte order mark)'
}

/**
 * `bytes` as UTF-8 text (a leading byte order mark dropped), or where they are not UTF-8. UTF-16
 * is told as such, with its byte order mark or without: NUL bytes are valid UTF-8, but neither
 * YAML nor JSON text holds one, and UTF-16 without a byte order mark (iconv -t UTF-16LE) has one
 * beside each ASCII character (before, found by a review, such a file was read as one odd string).
 */
export function decodeUtf8(bytes: Uint8Array): { text: string } | { problem: Utf8Problem } {
  if ((bytes[0] === 0xff && bytes[1] === 0xfe) || (bytes[0] === 0xfe && bytes[1] === 0xff)) return { problem: { utf16: true, bom: true, offset: 0, line: 1, col: 1 } }
  if (bytes.length >= 2 && (bytes[0] === 0) !== (bytes[1] === 0)) return { problem: { utf16: true, bom: false, offset: 0, line: 1, col: 1 } }
  try {
    return { text: new TextDecoder('utf-8', { fatal: true }).decode(bytes) }
  } catch {
    return { problem: { utf16: false, ...invalidUtf8At(bytes) } }
  }
}

/**
 * Where `bytes` (not valid UTF-8) stop being UTF-8: the first U+FFFD a lenient decoder put in
 * that the bytes do not spell (EF BF BD). All before it is valid, so its UTF-8 length is the offset.
 */
function invalidUtf8At(bytes: Uint8Array): { offset: number; line: number; col: number } {
  // The byte order mark kept, as the bytes have it: the offsets count it.
  const text = new TextDecoder('utf-8', { ignoreBOM: true }).decode(bytes)
  let i = text.indexOf('\uFFFD')
  let offset = Buffer.byteLength(text.slice(0, i))
  while (i >= 0 && bytes[offset] === 0xef && bytes[offset + 1] === 0xbf && bytes[offset + 2] === 0xbd) {
    const next = text.indexOf('\uFFFD', i + 1)
    offset += Buffer.byteLength(text.slice(i, next))
    i = next
  }
  const before = text.slice(0, i)
  return { offset, line: before.split('\n').length, col: i - before.lastIndexOf('\n') }
}
