// POST /v1/anomalies/{id}/ack: someone has looked at it. The first acknowledgement stands.
import { anomalyJson, isAnomalyId } from '../../core/anomalies.ts'
import { KeygateError } from '../../core/errors.ts'
import { shownInput } from '../../core/validate.ts'
import { defineOperation } from '../operation.ts'
import { AnomalyIdParam, AnomalySchema } from '../schemas.ts'

export default defineOperation({
  id: 'acknowledgeAnomaly',
  method: 'POST',
  path: '/v1/anomalies/{id}/ack',
  ids: { id: AnomalyIdParam },
  tag: 'anomalies',
  summary: 'Acknowledge an anomaly',
  description: 'Records who acknowledged it and when (and an audit row); acknowledging it again changes nothing.',
  response: { status: 200, description: 'The anomaly, acknowledged.', schema: AnomalySchema },
  errors: ['anomaly_not_found'],
  async handle({ params, actor, services }) {
    const id = params.id as string
    const notFound = new KeygateError('anomaly_not_found', `no anomaly has the id ${JSON.stringify(shownInput(id))}`)
    if (!isAnomalyId(id)) throw notFound
    const a = await services.anomalies.acknowledge(id, actor, services.now(), services.audit)
    if (!a) throw notFound
    return anomalyJson(a)
  },
})
