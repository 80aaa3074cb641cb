// Whether an asynchronous probe answers in time: the health gauges ask the store and Redis at
// each scrape, and the Redis health check pings while limits run in process. No imports.

/** Whether `probe` resolves within `ms`; a rejection or no answer in time is false. */
export async function answersWithin(probe: () => Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([probe().then(() => true), new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)))])
  } catch {
    return false
  } finally {
    clearTimeout(timer)
  }
}
