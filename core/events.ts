// Domain events of one keygate process (SPEC §5): what webhooks deliver and what the anomaly
// stream and logs may follow. Producers (the key service bridge, the anomaly detector, the
// gateway's rate limiter, the rotation scheduler) emit; consumers (the webhook dispatcher,
// the SSE stream) subscribe. In-process only: a consumer that must see every instance's events
// carries them itself (Redis, or the store).
//
// No event ever carries a plaintext key: key events carry the key's public JSON (id, name,
// type, scopes, status, dates), never its hash or secret.

export const EVENT_TYPES = ['key.created', 'key.rotated', 'key.revoked', 'key.expiring', 'anomaly.detected', 'rate_limit.exceeded'] as const
export type EventType = (typeof EVENT_TYPES)[number]

export interface KeygateEvent {
  type: EventType
  /** When it happened. */
  at: Date
  data: Readonly<Record<string, unknown>>
}

export type EventListener = (event: KeygateEvent) => void

export class EventBus {
  readonly #listeners = new Set<EventListener>()
  readonly #now: () => Date

  constructor(options: { now?: () => Date } = {}) {
    this.#now = options.now ?? (() => new Date())
  }

  /** Calls every listener synchronously; a listener that throws does not stop the others. */
  emit(type: EventType, data: Readonly<Record<string, unknown>>): void {
    const event: KeygateEvent = { type, at: this.#now(), data }
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
}
