// keygate's own files: the folder of its package.json, the same whether keygate runs from a clone
// (its TypeScript, with core/ one level down) or compiled into dist/ of a package installed from
// npm (two levels down), so its version and migrations are found either way.
import { existsSync, readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url))
  for (let up = 0; up < 3; up++) {
    dir = dirname(dir)
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'migrations'))) return dir
  }
  throw new Error(`keygate's package.json and migrations/ were not found above ${fileURLToPath(import.meta.url)}`)
}

export const PACKAGE_ROOT = packageRoot()

/** keygate's version, from its package.json. */
export const VERSION = (JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: string }).version
