// The cursor of a list walked in the order of a time and an id (keys and the audit log: created
// at, newest first; the expiring report: when each key ends, soonest first; the usage report: the
// range's end, which the walk keeps, and the last key id): the last row's time and id, and the
// list's name, as base64url JSON. A cursor is read back only if it holds what encode() writes (a time of 1970 to
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

/**
 * The lists walked with such a cursor, by what they are called in a message. A cursor names its
 * list, so that one list's cursor given to another is refused, not read as a position there
 * (found by a review: the key list's cursor, given to the audit log, listed the audit rows older
 * than that key's creation and said nothing). The filters are not bound: a cursor is a position
 * in the list's order, and the next page is what follows it under the filters given with it.
 */
const LISTS = { keys: 'the key list', audit: 'an audit log', expiring: 'the expiring report', deliveries: "a webhook's deliveries", usage: 'the usage report' } as const
export type CursorList = keyof typeof LISTS

export function encodeCursor(list: CursorList, at: Date, id: string): string {
  // The list last: a version before it read the first two members only, and so still reads a
  // cursor of this one during a rolling upgrade (and this one reads its cursors, without a list).
  return Buffer.from(JSON.stringify([at.toISOString(), id, list])).toString('base64url')
}

export function decodeCursor(list: CursorList, cursor: string): CursorPosition {
  let of: unknown
  try {
    const [at, id, named] = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as [unknown, unknown, unknown]
    of = named
    // An id as the store holds them: no NUL and no lone surrogate (text PostgreSQL cannot take; a
    // made-up cursor with one got a 500), and no longer than any id keygate writes.
    if (named === list || named === undefined) {
      if (typeof id === 'string' && id.length <= 128 && !id.includes('\u0000') && id.isWellFormed() && typeof at === 'string' && isDateTime(at)) return { at: new Date(at), id }
    }
  } catch {}
  // Another list's cursor is named as such; one that names this list (or none) and does not hold
  // what encode() writes was made up or changed (before, found by a review: "is a cursor of the
  // key list, not of the key list").
  if (typeof of === 'string' && of !== list && Object.hasOwn(LISTS, of)) throw fieldInvalid('cursor', `is a cursor of ${LISTS[of as CursorList]}, not of ${LISTS[list]}: a cursor continues the list that returned it`)
  throw fieldInvalid('cursor', 'is not a cursor this server returned')
}

/**
 * The page of `rows`, read with a limit of `limit + 1`: the first `limit`, and when there was
 * one more, the cursor after the last of them (`positionOf` gives its time and id).
 */
export function pageOf<T>(list: CursorList, rows: readonly T[], limit: number, positionOf: (last: T) => CursorPosition): Page<T> {
  const items = rows.slice(0, limit)
  const last = items[items.length - 1]
  if (rows.length <= limit || last === undefined) return { items, nextCursor: null }
  const { at, id } = positionOf(last)
  return { items, nextCursor: encodeCursor(list, at, id) }
}
