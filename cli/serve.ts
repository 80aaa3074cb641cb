import type { Io } from './io.ts'
import { UsageError } from './io.ts'

export async function runServe(_argv: string[], _io: Io): Promise<number> {
  throw new UsageError('serve is not wired yet')
}
