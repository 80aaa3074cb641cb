// The store's encryption key check on the embedded store (test/helpers/key-check.ts): an upgraded
// store, a rotation, and the store's generated key file.
import { keyFileRefused, lostKeyFile, rotation, upgraded } from './helpers/key-check.ts'

upgraded('embedded')
rotation('embedded')
lostKeyFile()
keyFileRefused()
