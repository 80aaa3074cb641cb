// The store's encryption key check on the embedded store (test/helpers/key-check.ts): first starts
// and pruned logs, and commands that change nothing; the rest is in store-key-check-embedded-keys.test.ts.
import { prunedLog, readOnlyCommands, twoFirstStarts } from './helpers/key-check.ts'

twoFirstStarts('embedded')
prunedLog('embedded')
readOnlyCommands('embedded')
