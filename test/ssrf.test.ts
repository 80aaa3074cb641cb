// The words a refused webhook address is told in: every special range ipaddr.js knows has its
// own (before, found by a docs walk, the library's names were the message: "is a rfc6052
// address"), and a range a later ipaddr.js adds is still refused, by its name.
import t from 'tap'
import ipaddr from 'ipaddr.js'
import { addressRefusal, allowList, RANGE_WORDS } from '../core/ssrf.ts'

const none = allowList([])

t.test('each special range is refused in words', async (t) => {
  t.equal(addressRefusal('127.0.0.1', none), '127.0.0.1 is a loopback address')
  t.equal(addressRefusal('64:ff9b::7f00:1', none), '64:ff9b::7f00:1 is a NAT64 address, which reaches the IPv4 address it embeds (RFC 6052)')
  t.equal(addressRefusal('fe80::1', none), 'fe80::1 is a link-local address')
  t.equal(addressRefusal('::', none), ':: is an unspecified address (this host)')
  t.equal(addressRefusal('10.1.2.3', none), '10.1.2.3 is a private address (RFC 1918)')
  t.equal(addressRefusal('::ffff:169.254.169.254', none), '169.254.169.254 is a link-local address', 'IPv4-mapped: judged as the IPv4 address')
  t.equal(addressRefusal('93.184.215.14', none), undefined, 'a public address is not refused')
  t.equal(addressRefusal('10.1.2.3', allowList(['10.0.0.0/8'])), undefined, 'nor one allowed')
})

t.test("every range name of the installed ipaddr.js has words", async (t) => {
  // The library's table of ranges (not in its types): a name added by an upgrade fails here first.
  const ranges = (c: unknown) => Object.keys((c as { prototype: { SpecialRanges: Record<string, unknown> } }).prototype.SpecialRanges)
  const names = [...ranges(ipaddr.IPv4), ...ranges(ipaddr.IPv6)]
  t.ok(names.length > 20, 'the library lists its ranges')
  t.same(names.filter((n) => RANGE_WORDS[n] === undefined && n !== 'unicast'), [], 'none without words')
})
