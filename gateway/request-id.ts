// Request ids: a random per-process prefix and a counter in base 36 (`Xq3vK9pA-1b7`), unique
// across processes and far cheaper than a UUID. Never a UUID v4: the log scrubber redacts
// those as possible legacy keys. A client's X-Request-Id is kept when it looks like an id.
import { randomBase62 } from '../core/keys/format.ts'
import type { RequestState, Stage } from './state.ts'

const SANE = /^[A-Za-z0-9.:-]{8,128}$/
const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/i
/** What else the log scrubber hides that such an id can hold: a run of 40 or 64 hex digits (a Gitea token, a SHA-256), a JWT's start. */
const SCRUBBED = /(?<![0-9a-f])[0-9a-f]{40}(?:[0-9a-f]{24})?(?![0-9a-f])|eyJ/i

export function createRequestIdGenerator(): () => string {
  const prefix = randomBase62(8) + '-'
  let n = 0
  return () => prefix + (++n).toString(36)
}

/**
 * Whether a client-sent id is kept: 8–128 of A-Z a-z 0-9 . : - (no `_`, so never a keygate key),
 * and nothing the log scrubber hides (a UUID v4, a run of 40 or 64 hex digits): such an id read
 * `[redacted]` in the log and in error answers, and told nothing (found by a read-back).
 */
export function isAcceptableRequestId(value: string | undefined): value is string {
  return value !== undefined && SANE.test(value) && !UUID_V4.test(value) && !SCRUBBED.test(value)
}

export function createRequestIdStage(options: { accept: boolean; next: () => string }): Stage {
  const next = options.next
  if (!options.accept) {
    return (s: RequestState) => {
      s.id = next()
      return undefined
    }
  }
  return (s: RequestState) => {
    const given = s.headers['x-request-id']
    s.id = typeof given === 'string' && isAcceptableRequestId(given) ? given : next()
    return undefined
  }
}
