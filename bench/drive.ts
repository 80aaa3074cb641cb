// A fixed number of requests, closed loop over a few keep-alive connections (bench/instructions.ts):
// node bench/drive.ts <url> <headers JSON> <requests> <connections>. Prints {"done","other"}:
// how many were answered, and how many of those not with 200.
import { Pool } from 'undici'

const [url, headersJson, requests, connections] = process.argv.slice(2)
const target = new URL(url as string)
const headers = JSON.parse(headersJson as string) as Record<string, string>
const total = Number(requests)
const pool = new Pool(target.origin, { connections: Number(connections), pipelining: 1 })
let sent = 0
let done = 0
let other = 0
await new Promise<void>((resolve, reject) => {
  const next = (): void => {
    if (sent === total) return
    sent++
    pool.request({ path: target.pathname, method: 'GET', headers }).then(async (r) => {
      if (r.statusCode !== 200) other++
      await r.body.dump()
      if (++done === total) resolve()
      else next()
    }, reject)
  }
  for (let i = 0; i < Number(connections); i++) next()
})
await pool.close()
process.stdout.write(JSON.stringify({ done, other }) + '\n')
