// `keygate serve` on a fresh PostgreSQL database reached through a TCP gate the test can silence,
// pause or shut (test/helpers/tcp-gate.ts), in front of a loopback upstream.
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { startUpstream, type Tap } from './gateway.ts'
import { isolatedEnv, serve } from './serve.ts'
import { freshDatabase } from './stores.ts'
import { gateInFront } from './tcp-gate.ts'
import { scratchDir } from './scratch.ts'

/** keygate serving an upstream, with `yaml` as its configuration file and `env` (its secrets) added to an isolated environment. */
export async function serveBehindGate(t: Tap, name: string, yaml: string, env: Record<string, string>) {
  const url = await freshDatabase(t)
  const { gate, url: through } = await gateInFront(t, url)
  const cwd = scratchDir(`keygate-${name}-`)
  writeFileSync(join(cwd, 'keygate.yaml'), yaml)
  const upstream = await startUpstream(t)
  const served = await serve(t, { args: ['--upstream', upstream.url], env: isolatedEnv({ DATABASE_URL: through, KEYGATE_CONFIG: join(cwd, 'keygate.yaml'), ...env }), cwd })
  return { gate, serve: served, upstream }
}
