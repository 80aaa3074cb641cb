// A command's work on the store itself, when no admin API is named: the store runtime, the key
// events of its changes queued for the running servers' webhooks, and, with Redis, the
// invalidations every gateway drops the key on. Loaded by main.ts only for such a command: a
// command through the admin API, a usage error or --help loads none of the store, Redis or
// webhook code (about a third of a command's start-up before).
import { resolve } from 'node:path'
import type { Redis } from 'ioredis'
import type { Config } from '../config/schema.ts'
import { EventBus } from '../core/events.ts'
import { bindInvalidations, sendInvalidation } from '../core/invalidation.ts'
import type { Logger } from '../core/log.ts'
import { DEFAULT_DATA_DIR, embeddedStoreExists } from '../core/db.ts'
import { openRuntime, type Runtime } from '../core/runtime.ts'
import { bindKeyEvents, WebhookService } from '../core/webhooks.ts'
import type { DenyListService } from '../core/deny-list.ts'

/**
 * Opens the store (`existingOnly`: refused with that hint when there is none yet; `readOnly`: for a
 * command that changes nothing, see core/audit.ts checkStoreKey; `fresh`: the folder of the new
 * embedded store it makes, newEmbeddedStoreAt's, warned of), builds the
 * command's context with `open`, runs `action` on it, and closes everything after. The changes of
 * the runtime's keys, and of the deny list service `open` names (`denyList`), are published on Redis.
 */
export async function runLocal<C>(
  config: Config,
  log: Logger,
  { existingOnly, readOnly, fresh }: { existingOnly: string | undefined; readOnly: boolean; fresh: string | undefined },
  open: (runtime: Runtime) => Promise<{ ctx: C; close?: () => Promise<void>; denyList?: DenyListService }>,
  action: (ctx: C) => Promise<number>,
): Promise<number> {
  const runtime = await openRuntime(config, log, { shortLived: true, readOnly, ...(existingOnly !== undefined ? { existingOnly } : {}) })
  // Before (found by a review): a command run without the service's KEYGATE_DATA_DIR (sudo drops
  // it) made a store of its own in the working folder without a word, and the key it printed was
  // one the service never knew.
  if (fresh) log.warn('made a new embedded store: none was there. A running service keeps its store where its KEYGATE_DATA_DIR (store.data_dir) points, or goes through its admin API (KEYGATE_ADMIN_URL)', { data_dir: fresh })
  // Each part closes in the `finally` once made: a failure making a later one (Redis's client
  // failing to load, say) still closes what came before, the store last.
  let opened: Awaited<ReturnType<typeof open>> | undefined
  let published: (() => Promise<void>) | undefined
  let webhooks: WebhookService | undefined
  let offQueue: (() => void) | undefined
  let offKeys: (() => void) | undefined
  const queued: Array<Promise<unknown>> = []
  let failed = false
  try {
    opened = await open(runtime)
    published = config.redis.url ? await invalidationsOf(config.redis.url, config.redis.key_prefix, runtime, opened.denyList, log) : undefined
    // Key events of changes made here are queued in the store; the running servers deliver them.
    webhooks = new WebhookService({ db: runtime.db, cipher: runtime.cipher, config: config.webhooks, log, deliver: false })
    const events = new EventBus()
    offQueue = webhooks.bind(events, (insert) => queued.push(insert))
    offKeys = bindKeyEvents(runtime.keys, events)
    return await action(opened.ctx)
  } catch (err) {
    failed = true
    throw err
  } finally {
    offKeys?.()
    offQueue?.()
    // Every step, whatever one before it threw: before (found by a review), a warning that could
    // not be written (a full stderr) skipped the closing of the store, and a command on
    // PostgreSQL sat on its idle connection for the pool's 30 s before it ended. The first
    // failure is told after, unless the command's own is (it says what was done).
    let problem: { err: unknown } | undefined
    for (const step of [() => Promise.all(queued), () => webhooks?.close(), () => published?.(), () => opened?.close?.(), () => runtime.close()]) {
      try {
        await step()
      } catch (err) {
        problem ??= { err }
      }
    }
    if (problem !== undefined && !failed) throw problem.err
  }
}

/** The embedded store's folder when it holds no store yet (the command will make one), else undefined. */
export function newEmbeddedStoreAt(dataDir: string | undefined): string | undefined {
  const dir = resolve(dataDir ?? DEFAULT_DATA_DIR)
  return embeddedStoreExists(dir) ? undefined : dir
}

/**
 * With Redis configured, a change the CLI makes in the store is published like the admin API's,
 * so every gateway drops the key, or reads the deny list again, at once. Returns what waits for
 * the publishes before exit (each bounded: see sendInvalidation); a Redis that cannot be reached
 * or does not answer in time leaves the gateways to their store check (cache.store_check_s) and
 * their deny list reload (gateway.deny_list_refresh_s), with a warning. Before (found by a
 * review), the deny list's changes were not published: an address blocked at a terminal stayed
 * open on every gateway until its next reload, up to an hour, though Redis was there.
 */
async function invalidationsOf(url: string, keyPrefix: string, runtime: Runtime, denyList: DenyListService | undefined, log: Logger): Promise<() => Promise<void>> {
  // Loaded here: a command without Redis never loads its client.
  const [{ Redis }, { DISCONNECT_TIMEOUT_MS, redisReady }] = await Promise.all([import('ioredis'), import('../core/redis.ts')])
  // Connected on the first change only: commands that change nothing never touch Redis.
  let redis: Redis | undefined
  let ready: Promise<boolean> | undefined
  // Why it could not be reached, when its client said (a refused connection, a wrong password).
  let refused: Error | undefined
  const sent: Array<Promise<unknown>> = []
  let denyFailed = false
  const send = async (message: string): Promise<unknown> => {
    if (!redis) {
      redis = new Redis(url, { keyPrefix, enableOfflineQueue: false, maxRetriesPerRequest: 1, connectTimeout: 2000, keepAlive: 10_000, disconnectTimeout: DISCONNECT_TIMEOUT_MS, retryStrategy: () => null })
      redis.on('error', (err: Error) => {
        refused ??= err
      })
      ready = redisReady(redis, 2000)
    }
    // Before (found by a review): "Redis did not answer" whatever the reason, a refused connection too.
    if (!(await ready)) throw new Error(refused ? `Redis cannot be reached: ${refused.message}` : 'Redis did not answer within 2 s')
    return sendInvalidation(redis, message, 2000)
  }
  const off = bindInvalidations({
    keys: runtime.keys,
    ...(denyList ? { denyList } : {}),
    publish: (message) =>
      sent.push(
        send(message).catch((err: unknown) => {
          if (message === 'deny') denyFailed = true
          throw err
        }),
      ),
  })
  return async () => {
    off()
    const failed = (await Promise.allSettled(sent)).find((r) => r.status === 'rejected')
    // Disconnected first: the warning may fail to be written (a full stderr).
    redis?.disconnect()
    if (failed) {
      const err = (failed as PromiseRejectedResult).reason as Error
      if (denyFailed) log.warn('could not tell the gateways through Redis; they read the deny list again at their next reload (gateway.deny_list_refresh_s)', { err })
      else log.warn('could not tell the gateways through Redis; they drop the key at their next store check (cache.store_check_s), or within cache.ttl_s with it off', { err })
    }
  }
}
