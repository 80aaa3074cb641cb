// node bench/idle.ts [seconds]: the CPU an idle keygate (`keygate serve`, every stage on, the
// embedded store) uses per second of wall time, beside the bare proxy's, both started and left
// without requests. A sidecar runs beside every instance of a service: what it burns doing
// nothing is paid on every replica. Prints one line.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createKey, forkServer, keygateEnv, startKeygate } from './servers.ts'

const seconds = Number(process.argv[2] ?? 30)
// Before, anything else ran the whole bench and printed NaN (or a negative figure).
if (!(seconds > 0) || process.argv.length > 3) {
  process.stderr.write('usage: node bench/idle.ts [seconds], seconds a number above 0\n')
  process.exit(2)
}
const work = mkdtempSync(join(tmpdir(), 'keygate-idle-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const ticks = 100 // CLK_TCK on Linux
const cpu = (pid: number) => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')
  return (Number(f[11]) + Number(f[12])) / ticks
}
const upstream = (await forkServer('./upstream.ts')).port
const baseline = await forkServer('./baseline-proxy.ts', [`http://127.0.0.1:${upstream}`])
const env = keygateEnv(join(work, 'store'), upstream)
createKey(env)
const keygate = await startKeygate(env)
// Start-up (migrations, first reads, compilation) is not idling.
await new Promise((resolve) => setTimeout(resolve, 5000))
const before = { keygate: cpu(keygate.pid), baseline: cpu(baseline.pid) }
await new Promise((resolve) => setTimeout(resolve, seconds * 1000))
const perSecond = (now: number, then: number) => (((now - then) * 1000) / seconds).toFixed(1)
console.log(`idle over ${seconds} s, CPU ms per second: keygate ${perSecond(cpu(keygate.pid), before.keygate)}, bare proxy ${perSecond(cpu(baseline.pid), before.baseline)}`)
process.exit(0)
