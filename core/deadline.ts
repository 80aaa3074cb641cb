// Whether an asynchronous call answers in time: the health gauges ask the store and Redis at
// each scrape, the Redis health check probes while limits run in process, and the invalidation
// check and publish bound their Redis calls (a half-open connection never answers). No imports.

/** The rejection of `within` when no answer came in time. */
export class TimedOut extends Error {}

/** `promise`, or a TimedOut rejection (`what`: no answer within `ms` ms) after `ms`; the promise's own later rejection is ignored. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  promise.catch(() => {})
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TimedOut(`${what}: no answer within ${ms} ms`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** Whether `probe` resolves within `ms`; a rejection or no answer in time is false. */
export function answersWithin(probe: () => Promise<unknown>, ms: number): Promise<boolean> {
  let answer: Promise<unknown>
  try {
    answer = probe()
  } catch {
    return Promise.resolve(false)
  }
  return within(answer, ms, 'probe').then(
    () => true,
    () => false,
  )
}

/**
 * Calls to a server that may keep its connection and stop answering (a frozen Redis: SIGSTOP, a
 * hung host whose kernel still acknowledges), one out at a time: ioredis holds each command until
 * its answer or its connection's end, and where nothing reconnects (redis.invalidation_check_ms
 * 0), a call sent beside one still unanswered, past its deadline too, adds to those held for as
 * long as the server stays frozen.
 */
export class OneOut {
  #out: Promise<void> | undefined

  /** Whether the last call sent has not settled yet (send none beside it). */
  get out(): boolean {
    return this.#out !== undefined
  }

  /** `call`, followed until it settles. */
  send<T>(call: Promise<T>): Promise<T> {
    const out: Promise<void> = call
      .then(
        () => undefined,
        () => undefined,
      )
      .finally(() => {
        if (this.#out === out) this.#out = undefined
      })
    this.#out = out
    return call
  }
}
