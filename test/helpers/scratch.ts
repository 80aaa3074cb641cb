// Scratch folders for a test file's process, removed as it exits.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/** The folders scratchDir made in this process (before, found by a review, every run left its own in /tmp, some with a store of ~40 MB). */
const made: string[] = []
process.once('exit', () => {
  for (const dir of made) {
    try {
      rmSync(dir, { recursive: true, force: true })
    } catch {
      // Left to the system's cleanup of /tmp: an exit hook can neither wait nor report.
    }
  }
})

/** A new folder under the system's temporary folder, named `prefix` and six random characters, removed when this process exits. */
export function scratchDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  made.push(dir)
  return dir
}
