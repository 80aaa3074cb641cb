// The cursor of a list ordered newest first by (created_at, id): the last row's time and id, as
// base64url JSON. A cursor is read back only if it holds what encode() writes (a time of 1970 to
// 9999 and a string id), so a made-up one is a validation error, never a time the store refuses.
import { fieldInvalid } from './errors.ts'
import { isDateTime } from './formats.ts'

export function encodeCursor(createdAt: Date, id: string): string {
  return Buffer.from(JSON.stringify([createdAt.toISOString(), id])).toString('base64url')
}

export function decodeCursor(cursor: string): { createdAt: Date; id: string } {
  try {
    const [at, id] = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as [unknown, unknown]
    // An id as the store holds them: no NUL and no lone surrogate (text PostgreSQL cannot take; a
    // made-up cursor with one got a 500), and no longer than any id keygate writes.
    if (typeof id === 'string' && id.length <= 128 && !id.includes('\u0000') && id.isWellFormed() && typeof at === 'string' && isDateTime(at)) return { createdAt: new Date(at), id }
  } catch {}
  throw fieldInvalid('cursor', 'is not a cursor this server returned')
}
