// Request ids: a random per-process prefix and a counter in base 36 (`Xq3vK9pA-1b7`), unique
// across processes and far cheaper than a UUID. Never a UUID v4: the log scrubber redacts
// those as possible legacy keys. A client's X-Request-Id is kept when it looks like an id.
import { randomBase62 } from '../core/keys/format.ts'
import { scrub } from '../core/log.ts'
import type { RequestState, Stage } from './state.ts'

const SANE = /^[A-Za-z0-9.:-]{8,128}$/
/**
 * A JWT's start: `{"` in base64url, always `eyJ` in these letter cases. Before (found by a docs
 * review), any letter case: `Monkeyjump-0001` was replaced as one.
 */
const JWT_START = /eyJ/

export function createRequestIdGenerator(): () => string {
  const prefix = randomBase62(8) + '-'
  let n = 0
  return () => prefix + (++n).toString(36)
}

/**
 * Whether a client-sent id is kept: 8–128 of A-Z a-z 0-9 . : - (no `_`, so never a keygate key),
 * and nothing the log scrubber hides (a UUID v4, a run of 40 or 64 hex digits, a secret of the
 * configuration): such an id read `[redacted]` in the log and in error answers, and told nothing
 * (found by a read-back). The scrubber itself judges, so the two cannot drift apart (about 65 ns,
 * only for a request that brings an id). A JWT's start is refused even when the rest of the token
 * is not there, which the scrubber would leave.
 */
export function isAcceptableRequestId(value: string | undefined): value is string {
  return value !== undefined && SANE.test(value) && !JWT_START.test(value) && scrub(value) === value
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
