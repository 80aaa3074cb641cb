// One task at a time per key, within this process. The creates of one credential name wait for
// each other, so the second sees the first's credential in the service, which then refuses the
// name: a service that checks the name apart from the insert (Gitea) or a check of keygate's own
// before the create (n8n) would otherwise let both through; creates from another process are not
// ordered by this (the services' own refusal, or `delete`'s conflict over a shared name, is
// left). The failures of one address are counted one after another (core/lockout.ts).
export class KeyedQueue {
  /** The last task queued for each key, settled either way; gone once it is done and none follows. */
  readonly #tails = new Map<string, Promise<unknown>>()

  /** Runs `task` once every task queued before it with the same key has settled. */
  async run<T>(key: string, task: () => Promise<T>): Promise<T> {
    const mine = (this.#tails.get(key) ?? Promise.resolve()).then(task)
    const settled = mine.catch(() => undefined)
    this.#tails.set(key, settled)
    try {
      return await mine
    } finally {
      if (this.#tails.get(key) === settled) this.#tails.delete(key)
    }
  }
}
