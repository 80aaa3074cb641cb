// Cross-instance invalidation over Redis pub/sub: whoever changes a key or the deny list
// publishes, every gateway listening drops what it cached (SPEC §3: a revoked key stops
// working on every instance within 1 s with Redis). Messages: `key:<id>`, `hash:<sha256>`,
// `deny`, `all`, and `lock:<ms>:<address>` (an address locked out for <ms> by a gateway).
import type { Redis } from 'ioredis'
import type { DenyListService } from './deny-list.ts'
import type { KeyService } from './keys/service.ts'
import type { Logger } from './log.ts'

export const INVALIDATION_CHANNEL = 'keygate:invalidate'

export type InvalidationMessage = `key:${string}` | `hash:${string}` | `lock:${number}:${string}` | 'deny' | 'all'

/** Resolves once Redis has taken the message (or the failure is logged); never rejects. */
export async function publishInvalidation(redis: Redis, message: InvalidationMessage, log?: Logger): Promise<void> {
  await redis.publish(INVALIDATION_CHANNEL, message).catch((err: unknown) => log?.warn('could not publish an invalidation', { err: err as Error, message }))
}

/**
 * Calls `publish` with the invalidation messages of every committed change of `keys` (and
 * `denyList`); returns the unsubscriber. Redis pub/sub is one carrier, cluster IPC another.
 */
export function bindInvalidations(options: { keys?: KeyService; denyList?: DenyListService; publish: (message: InvalidationMessage) => void }): () => void {
  const { publish } = options
  const offs: Array<() => void> = []
  if (options.keys) {
    offs.push(
      options.keys.onChange((change) => {
        publish(`key:${change.key.id}`)
        publish(`hash:${change.key.keyHash}`)
        if (change.previous) publish(`key:${change.previous.id}`)
      }),
    )
  }
  if (options.denyList) offs.push(options.denyList.onChange(() => publish('deny')))
  return () => {
    for (const off of offs) off()
  }
}

/** Publishes every committed change of `keys` (and `denyList`) on Redis; returns the unsubscriber. */
export function bindInvalidationPublisher(options: { redis: Redis; keys?: KeyService; denyList?: DenyListService; log?: Logger }): () => void {
  const { redis, log } = options
  return bindInvalidations({
    ...(options.keys ? { keys: options.keys } : {}),
    ...(options.denyList ? { denyList: options.denyList } : {}),
    publish: (message) => void publishInvalidation(redis, message, log),
  })
}

/** Listens on a dedicated connection (a subscribed Redis connection can do nothing else). */
export async function subscribeInvalidations(redis: Redis, handler: (message: string) => void, log?: Logger): Promise<() => Promise<void>> {
  const sub = redis.duplicate()
  sub.on('error', (err: Error) => log?.warn('invalidation subscriber error', { err }))
  sub.on('message', (channel: string, message: string) => {
    if (channel === INVALIDATION_CHANNEL) handler(message)
  })
  // Redis being down must not stop a gateway from starting: subscribe when it is back
  // (ioredis resubscribes by itself after a subscription once succeeded).
  const trySubscribe = (): void => {
    sub.subscribe(INVALIDATION_CHANNEL).catch((err: unknown) => {
      log?.warn('could not subscribe to invalidations; retrying when Redis is ready', { err: err as Error })
      sub.once('ready', trySubscribe)
    })
  }
  trySubscribe()
  return async () => {
    sub.disconnect()
  }
}
