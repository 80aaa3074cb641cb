// What the `keygate serve --workers` tests share (test/serve-workers.test.ts and
// test/serve-workers-replace.test.ts, one file split in two so the halves run side by side).
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { startUpstream, type Tap } from './gateway.ts'
import { isolatedEnv } from './serve.ts'
import { freshDatabase } from './stores.ts'
import { scratchDir } from './scratch.ts'

export const ENCRYPTION_KEY = Buffer.alloc(32, 9).toString('base64')

/** A process's state letter as /proc shows it (R, S, T stopped, Z a zombie not reaped yet); throws when there is no such process. */
export const processState = (pid: number): string => readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /s, '')[0] as string

/** The pids of `parent`'s child processes (a `--workers` primary's workers), none when it has none. */
export function childrenOf(parent: number | undefined): number[] {
  try {
    return execFileSync('pgrep', ['-P', String(parent)], { encoding: 'utf8' }).trim().split('\n').map(Number)
  } catch {
    // pgrep exits 1 when nothing matches.
    return []
  }
}

/** A series' value in a scrape's text (NaN when absent). */
export const value = (text: string, series: string) => Number(new RegExp(`^${series.replace(/[{}]/g, '\\$&')} (\\S+)$`, 'm').exec(text)?.[1])

/**
 * A fresh PostgreSQL database and its environment (a bootstrap token), and an upstream answering
 * /slow after `slowMs`: `slowArrived` resolves once a /slow request reached it.
 */
export async function workersSetUp(t: Tap, name: string, slowMs: number) {
  const url = await freshDatabase(t)
  const cwd = scratchDir(`keygate-workers-${name}-`)
  const env = isolatedEnv({ DATABASE_URL: url, KEYGATE_ENCRYPTION_KEY: ENCRYPTION_KEY, KEYGATE_ADMIN_TOKEN: 'an-admin-token-of-32-characters!' })
  let arrived!: () => void
  const slowArrived = new Promise<void>((r) => (arrived = r))
  const upstream = await startUpstream(t, (req, res) => {
    if (req.url !== '/slow') return void res.end('ok')
    arrived()
    setTimeout(() => res.end('slow done'), slowMs)
  })
  return { cwd, env, upstream, slowArrived }
}
