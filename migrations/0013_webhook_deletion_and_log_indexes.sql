-- A webhook is deleted by marking it (deleted_at), and its delivery log is removed afterwards by
-- the scheduler, 5,000 rows to a statement (core/webhooks.ts, purgeDeleted). Before, found by a
-- review, one `DELETE FROM webhooks` cascaded through the whole log in one statement: with
-- 2,000,000 rows it ran past store.query_timeout_ms on every try and was rolled back, and each try
-- held the webhook's row lock, so every key change whose event the webhook takes waited behind it.
--
-- The indexes the delivery log is read by: a webhook's log (and one status of it) newest first, by
-- created_at cut to milliseconds and id, the order its cursor walks (a cursor holds a JS time, in
-- milliseconds); and a webhook's pending deliveries by when they are due, which the claim reads
-- webhook by webhook, so a paused or deleted webhook's held deliveries are never scanned.
-- created_at is cut in UTC (AT TIME ZONE), which makes the expression immutable, as an index needs.
--
-- Each index is built in the migrations' transaction, and writes to webhook_deliveries (queuing
-- an event: key changes wait for it) wait while they build: 12 s for 2,000,000 rows on 2 cores.
-- To keep that off the upgrade of a large log, build them first by hand with
-- `CREATE INDEX CONCURRENTLY IF NOT EXISTS` and these same names and definitions (README, Storage);
-- `IF NOT EXISTS` then finds them. The table locks come last, so they are held only briefly.
CREATE INDEX IF NOT EXISTS webhook_deliveries_log_idx
  ON webhook_deliveries (webhook_id, (date_trunc('milliseconds', created_at AT TIME ZONE 'UTC')), id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_log_status_idx
  ON webhook_deliveries (webhook_id, status, (date_trunc('milliseconds', created_at AT TIME ZONE 'UTC')), id);
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending_idx
  ON webhook_deliveries (webhook_id, next_attempt_at) WHERE status = 'pending';
-- Superseded by webhook_deliveries_log_idx (also led by webhook_id; by created_at, it ordered no
-- page of the log). webhook_deliveries_due stays: instances of the release before this one claim by it.
DROP INDEX IF EXISTS webhook_deliveries_webhook;
-- Set by DELETE /v1/webhooks/{id}: from then on the webhook is not listed, not found, queues and
-- sends nothing; the row goes once its deliveries have. (During a rolling upgrade, an instance of
-- the release before this one still lists it and may send its pending deliveries; it queues
-- nothing for it, as the delete sets enabled to false too.)
ALTER TABLE webhooks ADD COLUMN deleted_at timestamptz;
