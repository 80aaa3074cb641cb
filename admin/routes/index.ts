// The operation table of the admin API: routes, request validation and the OpenAPI document
// are all made from this one list. Literal paths come before parameterised ones that could
// match them (`/v1/keys/validate` before `/v1/keys/{id}`).
import type { Operation } from '../operation.ts'
import acknowledgeAnomaly from './anomalies-ack.ts'
import listAnomalies from './anomalies-list.ts'
import streamAnomalies from './anomalies-stream.ts'
import listAudit from './audit-list.ts'
import addDenyEntry from './deny-list-add.ts'
import listDenyList from './deny-list-list.ts'
import removeDenyEntry from './deny-list-remove.ts'
import liftLockout from './lockouts-lift.ts'
import listLockouts from './lockouts-list.ts'
import createGiteaToken from './gitea-tokens-create.ts'
import deleteGiteaToken from './gitea-tokens-delete.ts'
import listGiteaTokens from './gitea-tokens-list.ts'
import verifyGiteaToken from './gitea-tokens-verify.ts'
import getKeyAudit from './keys-audit.ts'
import createKey from './keys-create.ts'
import getKey from './keys-get.ts'
import importKeys from './keys-import.ts'
import listKeys from './keys-list.ts'
import revokeKey from './keys-revoke.ts'
import rotateKey from './keys-rotate.ts'
import updateKey from './keys-update.ts'
import validateKey from './keys-validate.ts'
import createN8nKey from './n8n-keys-create.ts'
import deleteN8nKey from './n8n-keys-delete.ts'
import listN8nKeys from './n8n-keys-list.ts'
import verifyN8nKey from './n8n-keys-verify.ts'
import reportExpiring from './reports-expiring.ts'
import reportRejections from './reports-rejections.ts'
import reportTopKeys from './reports-top-keys.ts'
import reportUsage from './reports-usage.ts'
import getStats from './stats.ts'
import createWebhook from './webhooks-create.ts'
import deleteWebhook from './webhooks-delete.ts'
import getWebhook from './webhooks-get.ts'
import listWebhookDeliveries from './webhooks-deliveries.ts'
import retryFailedWebhookDeliveries from './webhooks-deliveries-retry.ts'
import retryWebhookDelivery from './webhooks-delivery-retry.ts'
import listWebhooks from './webhooks-list.ts'
import rotateWebhookSecret from './webhooks-rotate-secret.ts'
import testWebhook from './webhooks-test.ts'
import updateWebhook from './webhooks-update.ts'

export const OPERATIONS: readonly Operation[] = Object.freeze([
  createKey,
  listKeys,
  validateKey,
  importKeys,
  getKey,
  updateKey,
  revokeKey,
  rotateKey,
  getKeyAudit,
  listAudit,
  getStats,
  reportUsage,
  reportTopKeys,
  reportRejections,
  reportExpiring,
  listDenyList,
  addDenyEntry,
  listLockouts,
  liftLockout,
  removeDenyEntry,
  createGiteaToken,
  listGiteaTokens,
  verifyGiteaToken,
  deleteGiteaToken,
  createN8nKey,
  listN8nKeys,
  verifyN8nKey,
  deleteN8nKey,
  listAnomalies,
  streamAnomalies,
  acknowledgeAnomaly,
  createWebhook,
  listWebhooks,
  getWebhook,
  updateWebhook,
  deleteWebhook,
  testWebhook,
  rotateWebhookSecret,
  listWebhookDeliveries,
  retryFailedWebhookDeliveries,
  retryWebhookDelivery,
])
