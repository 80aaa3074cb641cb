// DELETE /v1/lockouts/{address}: an address locked out after failed key attempts may try again
// at once, on every instance (before, found by a review, only the end of its window or a restart
// of every instance, after deleting its Redis key by hand, lifted it).
import { Type } from '@sinclair/typebox'
import { isKeygateError, KeygateError } from '../../core/errors.ts'
import { defineOperation } from '../operation.ts'
import { lockoutAddress } from '../schemas.ts'

export default defineOperation({
  id: 'liftLockout',
  method: 'DELETE',
  path: '/v1/lockouts/{address}',
  params: { address: Type.String({ format: 'lockout-address', maxLength: 64, description: 'The address (IPv4 or IPv6; an IPv6 address lifts its network), or the IPv6 network as `GET /v1/lockouts` lists it (`address_key`, its `/` encoded as `%2F`).' }) },
  tag: 'lockouts',
  summary: 'Lift the lockout of an address',
  description:
    'Ends the lockout an address got after `lockout.max_attempts` failed key or credential attempts within `lockout.window_s`, and forgets the failures it has counted, on the gateway and the admin API of every instance: in Redis, or in the `--workers` primary, then in each process (Redis pub/sub, cluster IPC). An IPv6 address is counted per network of `rate_limits.ipv6_prefix_bits`, so its whole network is lifted (`address_key`). Answers 200 whether or not a lockout was in force; `was_locked_out` says whether this instance held one. Audited as `lockout.lifted`. Rate limits are not lockouts and are not changed.',
  response: {
    status: 200,
    description: 'The lockout is lifted (or there was none).',
    schema: Type.Object({
      address: Type.String({ description: 'The address, as keygate writes it (IPv4-mapped IPv6 as IPv4).' }),
      address_key: Type.String({ description: 'What the lockout counts it under: the address, or its IPv6 network.' }),
      was_locked_out: Type.Boolean({ description: 'Whether this instance held a lockout of it.' }),
    }),
  },
  errors: ['store_unavailable'],
  async handle({ params, actor, services }) {
    const { address, addressKey } = lockoutAddress(params.address as string, 'address', services.addressKey)
    // The lift, then its audit row: a lift Redis refuses writes none, and no transaction is held
    // open while Redis is waited for (before, found by a review, the row was written first, in a
    // transaction that a frozen Redis kept open).
    let was: boolean
    try {
      was = await services.lockout.lift(addressKey)
    } catch (err) {
      // The lockout's own words (Redis down, refusing, or not answering in time: each says what
      // may have changed); anything else, as the store that did not take it. A lift Redis may
      // still carry out is audited as such (before, found by a review, it took effect unaudited).
      if (isKeygateError(err) && err.details?.unconfirmed === true) {
        await services.audit.write(services.db, actor, { action: 'lockout.lifted', details: { address, address_key: addressKey, confirmed: false, why: err.message } }).catch((e: unknown) => services.log.warn('could not audit an unconfirmed lockout lift', { err: e as Error }))
      }
      if (isKeygateError(err)) throw err
      throw new KeygateError('store_unavailable', `the lift did not complete (${(err as Error).message}); try again`, undefined, { cause: err })
    }
    try {
      await services.audit.write(services.db, actor, { action: 'lockout.lifted', details: { address, address_key: addressKey, confirmed: true, was_locked_out: was } })
    } catch (err) {
      throw new KeygateError('store_unavailable', `the lockout of ${address} was lifted, but its audit row could not be written (${(err as Error).message})`, undefined, { cause: err })
    }
    return { address, address_key: addressKey, was_locked_out: was }
  },
})
