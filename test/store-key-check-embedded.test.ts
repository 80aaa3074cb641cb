// The store's encryption key check on the embedded store (test/helpers/key-check.ts): first starts
// and pruned logs; the rest is in store-key-check-embedded-keys.test.ts.
import { prunedLog, twoFirstStarts } from './helpers/key-check.ts'

twoFirstStarts('embedded')
prunedLog('embedded')
