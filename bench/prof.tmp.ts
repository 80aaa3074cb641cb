import { execFileSync } from 'node:child_process'
import { keygateEnv, startKeygate, forkServer, createKey, here } from './servers.ts'
const up = (await forkServer('./upstream.ts')).port
const env = keygateEnv('/tmp/prof/kg', up)
const key = createKey(env)
const headers = { 'x-forwarded-for': '203.0.113.9', authorization: `Bearer ${key}` }
const s = await startKeygate(env, ['/tmp/prof/wrap.sh'])
execFileSync(process.execPath, [here('./drive.ts'), `http://127.0.0.1:${s.port}/`, JSON.stringify(headers), '200000', '32'])
s.child.kill('SIGTERM')
await new Promise((r) => s.child.once('exit', r))
process.exit(0)
