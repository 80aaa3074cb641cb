// The Redis connection of a keygate process. Commands fail at once while it is down (no offline
// queue), so the rate limiters' in-memory insurance takes over instead of requests waiting;
// reconnection goes on in the background with a capped backoff.
import { Redis } from 'ioredis'
import type { Logger } from './log.ts'

export function connectRedis(url: string, log: Logger): Redis {
  const redis = new Redis(url, {
    enableOfflineQueue: false,
    // Commands issued in the same tick (the limits of concurrent requests) go out as one pipeline.
    enableAutoPipelining: true,
    maxRetriesPerRequest: 1,
    connectTimeout: 2000,
    retryStrategy: (times) => Math.min(100 * 2 ** Math.min(times, 5), 2000),
  })
  let down = false
  redis.on('error', (err: Error) => {
    if (!down) log.warn('Redis is unreachable; limits fall back to this process until it returns', { err })
    down = true
  })
  redis.on('ready', () => {
    if (down) log.info('Redis is back')
    down = false
  })
  return redis
}

/** Waits up to `ms` for the first connection; start-up goes on without Redis if it does not come. */
export function redisReady(redis: Redis, ms: number): Promise<boolean> {
  if (redis.status === 'ready') return Promise.resolve(true)
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      redis.off('ready', onReady)
      resolve(false)
    }, ms)
    const onReady = () => {
      clearTimeout(timer)
      resolve(true)
    }
    redis.once('ready', onReady)
  })
}
