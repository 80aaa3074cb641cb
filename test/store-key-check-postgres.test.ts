// The store's encryption key check on PostgreSQL (test/helpers/key-check.ts), and a rolling
// restart of several instances onto a new key.
import { prunedLog, readOnlyCommands, rollingRestart, rotation, twoFirstStarts, upgraded } from './helpers/key-check.ts'

twoFirstStarts('postgres')
prunedLog('postgres')
upgraded('postgres')
rotation('postgres')
rollingRestart()
readOnlyCommands('postgres')
