// Domain events of one keygate process (SPEC §5): what webhooks deliver and what the anomaly
// stream and logs may follow. Producers (the key service bridge, the anomaly detector, the
// gateway's rate limiter, the rotation scheduler) emit; consumers (the webhook dispatcher,
// the SSE stream) subscribe. In-process only: a consumer that must see every instance's events
// carries them itself (Redis, or the store).
//
// An event that tells of a change in the store is staged inside the change's transaction
// (`stage`): durable consumers (the webhook queue) write their rows there, so a crash between the
// commit and the emit loses nothing (a review saw 19 committed revocations whose key.revoked was
// never queued after a SIGKILL). The producer publishes it once the transaction has committed.
//
// No event ever carries a plaintext key: key events carry the key's public JSON (id, name,
// type, scopes, status, dates), never its hash or secret.

import type { Queryable } from './db.ts'

export const EVENT_TYPES = ['key.created', 'key.rotated', 'key.revoked', 'key.expiring', 'anomaly.detected', 'rate_limit.exceeded'] as const
export type EventType = (typeof EVENT_TYPES)[number]

export interface KeygateEvent {
  type: EventType
  /** When it happened. */
  at: Date
  data: Readonly<Record<string, unknown>>
  /** Staged: the durable consumers wrote it in the transaction of its change (see `stage`). */
  staged?: true
}

export type EventListener = (event: KeygateEvent) => void
/** A durable consumer: writes its rows for `events` with `q`, the transaction of their change. */
export type EventStager = (q: Queryable, events: readonly KeygateEvent[]) => Promise<void>

export class EventBus {
  readonly #listeners = new Set<EventListener>()
  readonly #stagers = new Set<EventStager>()
  readonly #now: () => Date

  constructor(options: { now?: () => Date } = {}) {
    this.#now = options.now ?? (() => new Date())
  }

  /** Calls every listener synchronously; a listener that throws does not stop the others. */
  emit(type: EventType, data: Readonly<Record<string, unknown>>): void {
    this.publish({ type, at: this.#now(), data })
  }

  /**
   * Makes the event of a change inside its transaction `q` and has every stager write it there:
   * a stager that fails fails the change. Publish the event once `q` has committed.
   */
  async stage(q: Queryable, type: EventType, data: Readonly<Record<string, unknown>>): Promise<KeygateEvent> {
    return (await this.stageMany(q, [{ type, data }]))[0] as KeygateEvent
  }

  /**
   * `stage` for the events of one transaction at once, which each stager writes in a few
   * statements: a scheduler batch announcing 1,000 keys staged each in its own statement, about
   * 0.57 s of the embedded store's time a batch.
   */
  async stageMany(q: Queryable, items: ReadonlyArray<{ type: EventType; data: Readonly<Record<string, unknown>> }>): Promise<KeygateEvent[]> {
    const at = this.#now()
    const events = items.map((e): KeygateEvent => ({ type: e.type, at, data: e.data, staged: true }))
    if (events.length > 0) for (const s of this.#stagers) await s(q, events)
    return events
  }

  /** Calls every listener synchronously with `event` (made by `stage`, or by `emit`). */
  publish(event: KeygateEvent): void {
    for (const l of this.#listeners) {
      try {
        l(event)
      } catch {
        // A consumer's failure is its own to log; the producer (often the request path) goes on.
      }
    }
  }

  /** Returns the unsubscriber. */
  on(listener: EventListener): () => void {
    this.#listeners.add(listener)
    return () => this.#listeners.delete(listener)
  }

  /** A durable consumer of staged events (returns the unsubscriber). */
  onStage(stager: EventStager): () => void {
    this.#stagers.add(stager)
    return () => this.#stagers.delete(stager)
  }
}
