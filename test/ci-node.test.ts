// .ci/node.sh, which bin/dev and .ci/run source under `set -euo pipefail`: on a machine whose node
// is too old, a Node 24 in the cache folder is used, and with none there it is fetched (here: the
// fetch is refused for want of npm, with a message, where before the script ended at once, exit 2
// and not a word, because `ls` of an empty cache folder failed the pipeline).
import t from 'tap'
import { execFileSync, spawnSync } from 'node:child_process'
import { chmodSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const ROOT = new URL('..', import.meta.url).pathname
const dir = mkdtempSync(join(tmpdir(), 'keygate-ci-node-'))
t.teardown(() => rmSync(dir, { recursive: true, force: true }))

// A PATH with the tools the script uses, an old `node` and no npm.
const bin = join(dir, 'bin')
mkdirSync(bin)
for (const tool of ['bash', 'ls', 'sort', 'tail', 'uname', 'mkdir', 'mktemp', 'rm', 'cat']) {
  symlinkSync(execFileSync('bash', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).trim(), join(bin, tool))
}
writeFileSync(join(bin, 'node'), '#!/bin/sh\n[ "$1" = --version ] && echo v20.20.2\nexit 1\n')
chmodSync(join(bin, 'node'), 0o755)

function ensureNode(cache: string) {
  return spawnSync(join(bin, 'bash'), ['-c', 'set -euo pipefail; . .ci/node.sh; ensure_node; node --version'], {
    cwd: ROOT,
    env: { PATH: bin, HOME: dir, KEYGATE_CACHE_DIR: cache },
    encoding: 'utf8',
  })
}

t.test('an empty cache folder: the fetch is tried, and refused with a message (npm is missing here)', async (t) => {
  const r = ensureNode(join(dir, 'empty-cache'))
  t.equal(r.status, 1)
  t.match(r.stderr, /keygate: npm is needed to fetch Node 24/)
})

t.test('a Node 24 in the cache folder is put first on PATH', async (t) => {
  const cache = join(dir, 'cache')
  mkdirSync(join(cache, 'node-24.99.0', 'bin'), { recursive: true })
  symlinkSync(process.execPath, join(cache, 'node-24.99.0', 'bin', 'node'))
  const r = ensureNode(cache)
  t.equal(r.status, 0, r.stderr)
  t.equal(r.stdout.trim(), process.version)
})
