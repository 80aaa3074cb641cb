// node bench/import.ts [--rows 10000] [--rounds 3] [--keygate OTHER/bin/keygate.ts]
// What `keygate api-key import` of `rows` legacy keys costs, on the embedded store and, with
// DATABASE_URL, on PostgreSQL. Each round, on a fresh store (migrated first, not timed):
// `keygate api-key stats`, the baseline (a command that starts, opens the store, runs one query
// and exits), then `keygate api-key import FILE` of a file of new rows. Prints the medians of
// their wall times, the import's as a ratio of the baseline's in the same round, and the rows a
// second the import writes past the baseline's time. `--keygate` measures another checkout's
// command beside this one's, in the same rounds (the code before a change, say).
import { spawnSync } from 'node:child_process'
import { createHash, randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { countArg as arg, freshStores, here, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('rows', 'rounds', 'keygate')

const ROWS = arg('rows', 10_000)
const ROUNDS = arg('rounds', 3)
const { values } = parseArgs({ options: { keygate: { type: 'string', multiple: true }, rows: { type: 'string' }, rounds: { type: 'string' } } })
const commands = [here('../bin/keygate.ts'), ...(values.keygate ?? [])]

const dir = mkdtempSync(join(tmpdir(), 'keygate-bench-import-'))
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))

let files = 0
function rowsFile(): string {
  const path = join(dir, `rows${files++}.jsonl`)
  const rows: string[] = []
  for (let i = 0; i < ROWS; i++) {
    rows.push(JSON.stringify({ key_hash: createHash('sha256').update(randomUUID()).digest('hex'), name: `legacy ${i}`, owner: 'team-a', scopes: ['orders:read'] }))
  }
  writeFileSync(path, rows.join('\n') + '\n')
  return path
}

/** Runs a keygate command to its end; its wall time in seconds. */
function timed(command: string, args: string[], env: Record<string, string>): number {
  const start = performance.now()
  const r = spawnSync(process.execPath, [command, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' })
  const s = (performance.now() - start) / 1000
  if (r.status !== 0) throw new Error(`keygate ${args.join(' ')} exited with ${r.status}: ${r.stderr}`)
  return s
}

const stores = freshStores(dir)

type Times = { baseline: number[]; import: number[] }
const results = new Map<string, Times>()
for (let round = 1; round <= ROUNDS; round++) {
  for (const store of stores) {
    for (const command of commands) {
      const { env, drop } = await store.open()
      try {
        timed(command, ['migrate'], env)
        const baseline = timed(command, ['api-key', 'stats'], env)
        const imported = timed(command, ['api-key', 'import', rowsFile()], env)
        const key = `${store.name}\t${command}`
        const times = results.get(key) ?? { baseline: [], import: [] }
        times.baseline.push(baseline)
        times.import.push(imported)
        results.set(key, times)
        process.stdout.write(`round ${round}, ${store.name}, ${command}: stats ${baseline.toFixed(2)} s, import ${imported.toFixed(2)} s\n`)
      } finally {
        await drop()
      }
    }
  }
}

process.stdout.write(`\n${ROWS} rows, ${ROUNDS} rounds; medians\n\n| store | keygate | stats s | import s | import / stats | rows/s past stats |\n| --- | --- | --- | --- | --- | --- |\n`)
for (const [key, times] of results) {
  const [store, command] = key.split('\t')
  const ratios = times.import.map((s, i) => s / (times.baseline[i] as number))
  const past = times.import.map((s, i) => ROWS / Math.max(s - (times.baseline[i] as number), 0.001))
  process.stdout.write(`| ${store} | ${command} | ${median(times.baseline).toFixed(2)} | ${median(times.import).toFixed(2)} | ${median(ratios).toFixed(2)} | ${Math.round(median(past)).toLocaleString('en')} |\n`)
}
