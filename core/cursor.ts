// The cursor of a list walked in the order of a time and an id (keys and the audit log: created
// at, newest first; the expiring report: when each key ends, soonest first; the usage report: the
// range's end, which the walk keeps, and the last key id): the last row's time and id, as
// base64url JSON. A cursor is read back only if it holds what encode() writes (a time of 1970 to
// 9999 and a string id), so a made-up one is a validation error, never a time the store refuses.
import { fieldInvalid } from './errors.ts'
import { isDateTime } from './formats.ts'

/** What a cursor looks like (base64url, bounded), for the schemas and flags that take one. */
export const CURSOR_PATTERN = '^[A-Za-z0-9_-]{1,200}$'

/** Where a walk stopped: the time and id of the last row of the previous page. */
export interface CursorPosition {
  at: Date
  id: string
}

/** One page of a list; `nextCursor` is null on the last page. */
export interface Page<T> {
  items: T[]
  nextCursor: string | null
}

export function encodeCursor(at: Date, id: string): string {
  return Buffer.from(JSON.stringify([at.toISOString(), id])).toString('base64url')
}

export function decodeCursor(cursor: string): CursorPosition {
  try {
    const [at, id] = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as [unknown, unknown]
    // An id as the store holds them: no NUL and no lone surrogate (text PostgreSQL cannot take; a
    // made-up cursor with one got a 500), and no longer than any id keygate writes.
    if (typeof id === 'string' && id.length <= 128 && !id.includes('\u0000') && id.isWellFormed() && typeof at === 'string' && isDateTime(at)) return { at: new Date(at), id }
  } catch {}
  throw fieldInvalid('cursor', 'is not a cursor this server returned')
}

/**
 * The page of `rows`, read with a limit of `limit + 1`: the first `limit`, and when there was
 * one more, the cursor after the last of them (`positionOf` gives its time and id).
 */
export function pageOf<T>(rows: readonly T[], limit: number, positionOf: (last: T) => CursorPosition): Page<T> {
  const items = rows.slice(0, limit)
  const last = items[items.length - 1]
  if (rows.length <= limit || last === undefined) return { items, nextCursor: null }
  const { at, id } = positionOf(last)
  return { items, nextCursor: encodeCursor(at, id) }
}
