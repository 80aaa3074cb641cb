// GET /v1/anomalies/stream: every anomaly as it is recorded, by any instance, as Server-Sent
// Events (`id` is the anomaly id, `event: anomaly.detected`, `data` its JSON). A client
// reconnecting with `Last-Event-ID` (or `?last_event_id=`) first gets what it missed from the
// table, then the live ones, none twice. A comment line every 15 s keeps proxies from closing
// an idle stream. A stream opened with an admin key ends when that key stops being an admin key.
import { Type } from '@sinclair/typebox'
import { ANOMALY_ID_PATTERN, anomalyJson, isAnomalyId, type AnomalyJson } from '../../core/anomalies.ts'
import { isKeygateError, KeygateError } from '../../core/errors.ts'
import { evaluateKey } from '../../core/keys/evaluate.ts'
import type { KeyRecord } from '../../core/keys/types.ts'
import { ADMIN_SCOPE } from '../auth.ts'
import { defineOperation } from '../operation.ts'
import { AnomalySchema } from '../schemas.ts'

const HEARTBEAT_MS = 15_000
const RESUME_MAX = 10_000

const frame = (a: AnomalyJson) => `id: ${a.id}\nevent: anomaly.detected\ndata: ${JSON.stringify(a)}\n\n`

export default defineOperation({
  id: 'streamAnomalies',
  method: 'GET',
  path: '/v1/anomalies/stream',
  tag: 'anomalies',
  summary: 'Follow anomalies live (Server-Sent Events)',
  description:
    'Each event: `id` (the anomaly id), `event: anomaly.detected`, `data` (the anomaly as JSON). Send `Last-Event-ID` (browsers do on reconnect) or `last_event_id` to receive the anomalies recorded after that one first.',
  stream: true,
  query: Type.Object(
    { last_event_id: Type.Optional(Type.String({ pattern: ANOMALY_ID_PATTERN, description: 'Resume after this anomaly id (as the Last-Event-ID header).' })) },
    { additionalProperties: false },
  ),
  response: { status: 200, description: 'The event stream; the data of each event is an anomaly.', schema: AnomalySchema },
  errors: ['validation_failed'],
  async handle({ query, req, res, requestId, services, actor }) {
    const header = req.headers['last-event-id']
    const resume = query.last_event_id ?? (typeof header === 'string' && header !== '' ? header : undefined)
    if (resume !== undefined && !isAnomalyId(resume)) {
      throw new KeygateError('validation_failed', 'Last-Event-ID: must be an anomaly id', { fields: [{ field: 'Last-Event-ID', message: 'must be an anomaly id' }] })
    }
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', 'x-request-id': requestId, 'x-accel-buffering': 'no' })
    res.write(': keygate anomaly stream\nretry: 2000\n\n')
    // Live ones are held back while the missed ones are read, so none comes twice or out of turn.
    let held: AnomalyJson[] | undefined = resume !== undefined ? [] : undefined
    const off = services.anomalyFeed.on(
      (a) => {
        if (held) held.push(a)
        else res.write(frame(a))
      },
      () => res.end(),
    )
    // A stream opened with an admin key ends once that key stops being one: at once when it is
    // revoked, expires or loses the admin scope through this instance, else at the next heartbeat
    // (a change made through another instance).
    const keyId = actor.actor.startsWith('key:') ? actor.actor.slice(4) : undefined
    const stillAdmin = (k: KeyRecord) => evaluateKey(k, services.now()).ok && k.scopes.includes(ADMIN_SCOPE)
    const offKeys =
      keyId === undefined
        ? () => {}
        : services.keys.onChange((c) => {
            if ((c.key.id === keyId && !stillAdmin(c.key)) || (c.previous?.id === keyId && !stillAdmin(c.previous))) res.end()
          })
    const heartbeat = setInterval(() => {
      res.write(': ping\n\n')
      if (keyId !== undefined) {
        services.keys.get(keyId).then(
          (k) => {
            if (!stillAdmin(k)) res.end()
          },
          (err: unknown) => {
            if (isKeygateError(err) && err.code === 'key_not_found') res.end()
          },
        )
      }
    }, HEARTBEAT_MS)
    heartbeat.unref()
    const done = () => {
      clearInterval(heartbeat)
      off()
      offKeys()
    }
    res.once('close', done)
    if (resume !== undefined) {
      try {
        const missed = await services.anomalies.after(resume, RESUME_MAX)
        const sent = new Set<string>()
        for (const a of missed) {
          res.write(frame(anomalyJson(a)))
          sent.add(a.id)
        }
        for (const a of held ?? []) if (!sent.has(a.id)) res.write(frame(a))
      } finally {
        held = undefined
      }
    }
    return undefined
  },
})
