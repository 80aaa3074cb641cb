// One run at a time, and none missed: for a flush or a check that takes what is pending when it
// begins.

/**
 * `task`, run one at a time. A call while it runs gets one more run after it (shared by every call
 * made meanwhile): the running one took what was pending before the call came, so each call's
 * promise settles only after a run that began after the call. A shutdown or a report that
 * flushes first then misses nothing counted before it.
 */
export function coalesced(task: () => Promise<void>): () => Promise<void> {
  let running: Promise<void> | undefined
  let next: Promise<void> | undefined
  const run = (): Promise<void> => {
    if (running !== undefined) {
      const again = () => {
        next = undefined
        return run()
      }
      next ??= running.then(again, again)
      return next
    }
    running = task().finally(() => {
      running = undefined
    })
    return running
  }
  return run
}
