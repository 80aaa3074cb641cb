// The configuration schema. This one tree is the TypeScript type (`Config`), the validator,
// the defaults, the environment mapping (`env`), the command-line flags (`flag`) and the
// documentation (`description`; docs/configuration.md is generated from it).
import { Type, type Static } from '@sinclair/typebox'
import '../core/formats.ts'
import { ALLOWED_HOST, NAME_TEXT } from '../core/validate.ts'
import { RouteScope } from '../core/keys/schemas.ts'
import { KEY_TYPES } from '../core/keys/types.ts'

export { KEY_TYPES }
export const KEY_SOURCES = ['authorization', 'x-api-key', 'query'] as const

interface Meta {
  description: string
  env?: string
  flag?: string
  secret?: boolean
}

const int = (def: number, min: number, max: number, meta: Meta) =>
  Type.Integer({ default: def, minimum: min, maximum: max, ...meta })
const optStr = (format: string, meta: Meta) => Type.Optional(Type.String({ format, ...meta }))

const Tls = Type.Optional(
  Type.Object(
    {
      cert: Type.String({ minLength: 1, description: 'Path of the PEM certificate chain (reloaded on SIGHUP).' }),
      key: Type.String({ minLength: 1, description: 'Path of the PEM private key (reloaded on SIGHUP).' }),
    },
    { additionalProperties: false, description: 'Terminate TLS on this listener.' },
  ),
)

const Limit = (limit: number, window: number, description: string) =>
  Type.Object(
    {
      limit: int(limit, 1, 1_000_000_000, { description: 'Requests allowed per window.' }),
      window_s: int(window, 1, 86_400, { description: 'Window length in seconds.' }),
    },
    { additionalProperties: false, description, default: { limit, window_s: window } },
  )
const OptionalLimit = (description: string) =>
  Type.Optional(
    Type.Object(
      {
        limit: Type.Integer({ minimum: 1, maximum: 1_000_000_000, description: 'Requests allowed per window.' }),
        window_s: Type.Integer({ minimum: 1, maximum: 86_400, description: 'Window length in seconds.' }),
      },
      { additionalProperties: false, description },
    ),
  )

const Route = Type.Object(
  {
    name: Type.String({ pattern: '^[a-z0-9][a-z0-9_-]{0,62}$', description: 'Route name, used as the metrics label (not `none`, the label of requests that match no route).' }),
    path: Type.String({ format: 'path-prefix', description: 'Path prefix this route matches.' }),
    host: Type.Optional(Type.String({ format: 'host-port', description: 'Only requests for this Host match (in any letter case; with a port, only that port, and before a route for the host alone).' })),
    upstream: Type.String({ format: 'base-url', description: 'Upstream base URL.' }),
    timeout_ms: int(30_000, 1, 3_600_000, { description: "Upstream response timeout in milliseconds: the wait for the answer's head once the request body is sent (504 upstream_timeout), and after the head the longest gap between two chunks of the answer (a longer one cuts it off: give streaming routes a timeout above their quietest gap)." }),
    keepalive_timeout_ms: int(4_000, 1, 600_000, {
      description:
        "How long a connection to the upstream is kept idle for the next request. Keep it below the upstream's own idle timeout (gunicorn's is 2 s, Node's 5 s, uvicorn's 5 s): a connection the upstream closes as a request is sent on it fails the request, unless it is idempotent without a body (sent again once, on another connection: docs/gateway.md, Forwarding). An upstream's `Keep-Alive: timeout=` (less 2 s) is followed when shorter. Routes to one upstream server (origin) share its connections, and the shortest of their values.",
    }),
    scopes: Type.Array(RouteScope, {
      default: [],
      description: 'Scopes a key needs (any one of them) for this route; empty means any valid key.',
    }),
    strip_prefix: Type.Boolean({ default: false, description: "Remove the path prefix before forwarding: `/api/items` goes as `/items` (after the upstream's base path), and `/api` itself as `/` (`/v2/` with the base path `/v2`). Where another route's paths reach this route's upstream paths on the same upstream server (origin) without this route's scopes (`/` beside `/api` stripping its prefix, or another base path there), a start and `config check` warn." }),
    preserve_host: Type.Boolean({ default: false, description: "Send the client's Host upstream instead of the upstream's own (X-Forwarded-Host carries it either way)." }),
    rewrite_redirects: Type.Boolean({
      default: true,
      description:
        "An upstream answer's `Location` that names the upstream's own URL (its origin and base path, as `upstream` gives them) goes to the client as the path it used (under the route's prefix with `strip_prefix`), as nginx's `proxy_redirect default` does: the upstream's address is not one the client can reach. Only where that path comes back to this route: on a route `/r` without `strip_prefix` to `http://svc/base`, `http://svc/base/r/x` is `/r/x`, and `http://svc/base/x`, which would be `/x`, another route's, passes as sent (before, found by a docs walk, this left that out). Any other `Location` passes as sent (docs/gateway.md).",
    }),
    cors_preflight: Type.Boolean({
      default: false,
      description:
        "Forward a browser's CORS preflight without a key, for the upstream to answer: an OPTIONS request with Origin and Access-Control-Request-Method and no credential (browsers send none on a preflight, so a cross-origin call that sends its key in a header was refused before it was made). It still passes the deny list, the lockout and the per-address rate limit, and reaches the upstream without identity headers. As Kong's key-auth with run_on_preflight off.",
    }),
  },
  { additionalProperties: false },
)

export const ConfigSchema = Type.Object(
  {
    gateway: Type.Object(
      {
        listen: Type.String({ format: 'listen', default: '0.0.0.0:8080', description: 'Gateway listen address.', env: 'KEYGATE_LISTEN', flag: 'listen' }),
        trusted_proxies: Type.Array(Type.String({ format: 'cidr' }), {
          default: [],
          description: 'Peers whose X-Forwarded-For is believed (CIDRs).',
          env: 'KEYGATE_TRUSTED_PROXIES',
        }),
        set_x_real_ip: Type.Boolean({
          default: false,
          description:
            "Also send the client's address in X-Real-IP, as nginx's `proxy_set_header X-Real-IP` does for upstreams that read it: the address keygate judged the request by (after trusted_proxies), not a header the client sent. A client's own X-Real-IP is removed either way.",
          env: 'KEYGATE_SET_X_REAL_IP',
        }),
        key_sources: Type.Array(Type.Union(KEY_SOURCES.map((s) => Type.Literal(s))), {
          default: ['authorization', 'x-api-key'],
          minItems: 1,
          uniqueItems: true,
          description: 'Where keys are read from, in order.',
        }),
        api_key_header: Type.String({
          default: 'X-API-Key',
          format: 'api-key-header',
          description:
            "The header the `x-api-key` key source reads (any letter case), such as `apikey`, Kong's key-auth default, for clients migrating without a change; removed before forwarding in every spelling, as X-API-Key is.",
          env: 'KEYGATE_API_KEY_HEADER',
        }),
        query_param: Type.String({ default: 'api_key', pattern: '^[A-Za-z0-9_.-]{1,64}$', description: 'Query parameter name when the query source is enabled.' }),
        strip_credential: Type.Boolean({ default: true, description: 'Remove the credential before forwarding.' }),
        reveal_key_status: Type.Boolean({
          default: false,
          description: 'Answer key_expired/key_revoked instead of key_invalid for known bad keys (off: a response never tells which).',
        }),
        max_connections: int(0, 0, 10_000_000, {
          description:
            "Client connections the gateway holds open at once (in each process under `--workers`); one more is closed as it is accepted, unanswered, counted in keygate_gateway_connections_refused_total and warned of at most once a minute. Each may hold a connection to an upstream too, so without a cap a client holding open file-descriptor-limit / 2 connections (requests to an upstream that is slow to answer) took every file descriptor, and the admin listener's health and metrics, the gateway's /healthz, and new connections to the store and Redis failed until they ended (found by a review). 0: derived from the process's open-file limit (Linux's soft `Max open files`), (limit - 256) / 2, at least 1, leaving 256 for the admin listener, the store's pool, Redis and the process's own files; no cap where the limit cannot be read or is unlimited. A number above what the limit allows is taken as given, with a warning at start.",
          env: 'KEYGATE_MAX_CONNECTIONS',
        }),
        max_header_bytes: int(16_384, 1024, 1_048_576, { description: 'Largest request header block accepted (431 above).' }),
        max_headers: int(100, 8, 1000, { description: 'Most request header lines accepted (431 above).' }),
        max_response_header_bytes: int(65_536, 1024, 1_048_576, {
          description: "Largest response header block taken from an upstream (502 upstream_unavailable above, naming the cause), counted as undici counts it: the header names and values, not the status line, colons and line ends (a few percent of a head); Envoy's default is 60 KiB.",
        }),
        accept_request_id: Type.Boolean({
          default: true,
          description:
            'Keep a client-sent X-Request-Id when it is 8-128 characters of A-Z a-z 0-9 . : - and holds nothing the log hides: a UUID v4, a run of 40 or 64 hex digits (in either letter case), `eyJ` (a JWT\'s start, anywhere in it; other letter cases are kept) or a configured secret such as the admin token; otherwise one is generated.',
        }),
        deny_list_refresh_s: int(5, 1, 3600, { description: 'How often the stored deny list is re-read (changes made by other processes).' }),
        headers_timeout_ms: int(10_000, 100, 600_000, { description: 'Time a client has to send its request headers.' }),
        keep_alive_timeout_ms: int(75_000, 1000, 3_600_000, {
          description:
            "How long a client's connection is kept open idle after an answer, for its next request (told to clients in `Keep-Alive: timeout=`). Behind a load balancer keep it above the balancer's idle timeout (AWS ALB 60 s, the default's reason; Google Cloud's 600 s: set 620000), or the balancer sends a request on a connection keygate has just closed and answers 502. As nginx's keepalive_timeout (75 s); before, Node's fixed 5 s.",
          env: 'KEYGATE_KEEP_ALIVE_TIMEOUT_MS',
        }),
        body_idle_timeout_ms: int(60_000, 0, 3_600_000, {
          description: 'A request body that brings nothing for this long is cut off: 408 request_timeout, or the connection closed once the answer has begun (0: never). A body that keeps moving has no time limit.',
        }),
        send_timeout_ms: int(60_000, 0, 3_600_000, {
          description:
            "An answer the client takes none of for this long is cut off: its connection closed and the upstream's response aborted, as nginx's send_timeout (0: never). A client that keeps reading has no time limit.",
        }),
        shutdown_timeout_ms: int(10_000, 0, 600_000, { description: 'How long in-flight requests may take to finish on SIGTERM.' }),
        tunnel_idle_timeout_s: int(3600, 0, 604_800, {
          description: 'A WebSocket tunnel that carries nothing either way for this long is closed (0: never).',
        }),
        tls: Tls,
      },
      { additionalProperties: false, default: {} },
    ),
    admin: Type.Object(
      {
        listen: Type.String({ format: 'listen', default: '127.0.0.1:8081', description: 'Admin listen address.', env: 'KEYGATE_ADMIN_LISTEN', flag: 'admin-listen' }),
        token: Type.Optional(Type.String({ format: 'admin-token', description: 'Bootstrap admin token.', env: 'KEYGATE_ADMIN_TOKEN', secret: true })),
        url: optStr('base-url', { description: 'Admin API address the CLI uses instead of opening the store.', env: 'KEYGATE_ADMIN_URL', flag: 'admin-url' }),
        max_body_bytes: int(1_048_576, 1024, 67_108_864, { description: 'Largest admin request body accepted (413 above).' }),
        max_header_bytes: int(16_384, 1024, 1_048_576, { description: 'Largest admin request header block accepted (431 above).' }),
        headers_timeout_ms: int(10_000, 100, 600_000, { description: 'Time a client has to send an admin request\'s headers (408 request_timeout after it); at most request_timeout_ms.' }),
        request_timeout_ms: int(60_000, 1000, 3_600_000, {
          description:
            'Time a client has to send a whole admin request, headers and body (408 request_timeout after it): an import of max_body_bytes over a slow link needs more than the default (64 MiB in 60 s is about 1.1 MB/s).',
        }),
        max_streams_per_credential: int(10, 1, 10_000, {
          description: 'Anomaly streams (GET /v1/anomalies/stream) one admin credential may hold open on one instance at once; one more is answered 429 too_many_streams.',
        }),
        stream_heartbeat_s: int(15, 1, 300, {
          description:
            'Seconds between the comment lines an anomaly stream sends while quiet, so that a proxy in between does not close it as idle (keep it below the shortest idle timeout on the way); a stream opened with an admin key that another instance revoked also ends at the next one.',
        }),
        stream_poll_ms: int(1000, 100, 60_000, {
          description:
            "Without Redis: how often, while an anomaly stream is open, this instance reads api_key_anomalies for the anomalies other instances found (at most 500 a read), so its streams carry every instance's; with Redis only while this instance's subscription to the anomaly channel is down (the channel announces them otherwise).",
        }),
        allowed_hosts: Type.Array(Type.String({ pattern: ALLOWED_HOST, maxLength: 253 }), {
          default: [],
          description:
            'Host names the admin listener answers to besides IP addresses and localhost (a DNS name a web page could rebind to 127.0.0.1 is refused, 421 host_not_allowed); ["*"] answers any.',
          env: 'KEYGATE_ADMIN_ALLOWED_HOSTS',
        }),
        tls: Tls,
      },
      { additionalProperties: false, default: {} },
    ),
    routes: Type.Array(Route, { default: [], description: 'Path-prefix routes to upstreams; the longest matching prefix wins. Two routes for one host whose paths are one as the gateway or a lenient upstream reads them (`/api/` and `/api`, `/admin` and `/ADMIN` or `/%61dmin`) are refused.' }),
    upstream: optStr('base-url', { description: 'Shortcut: a route named default for / to this upstream, added to the routes (refused when they have a route for / or one named default).', env: 'KEYGATE_UPSTREAM', flag: 'upstream' }),
    deny_list: Type.Array(Type.String({ format: 'cidr' }), { default: [], description: 'Addresses and CIDR ranges always refused. A range with host bits set (10.1.2.3/8) is a config error naming the network it would cover. One that denies every client (::/0) or every IPv4 client (0.0.0.0/0, or an IPv6 range holding ::ffff:0:0/96 such as ::/64) is taken, with a warning from config check and at start.' }),
    rate_limits: Type.Object(
      {
        per_address: Limit(1000, 1, 'Limit per client address.'),
        ipv6_prefix_bits: int(64, 32, 128, { description: 'IPv6 clients are counted per network of this size for rate limits, lockouts and the `distinct_addresses` anomaly (128: per address).' }),
        per_key: Type.Object(
          {
            default: Limit(100, 1, 'Limit per key for types without their own.'),
            system: OptionalLimit('Limit per system key.'),
            user: OptionalLimit('Limit per user key.'),
            service: Type.Optional(Limit(1000, 1, 'Limit per service key.')),
            integration: OptionalLimit('Limit per integration key.'),
            emergency: OptionalLimit('Limit per emergency key.'),
          },
          { additionalProperties: false, default: { service: { limit: 1000, window_s: 1 } } },
        ),
      },
      { additionalProperties: false, default: {} },
    ),
    lockout: Type.Object(
      {
        max_attempts: int(5, 1, 1_000_000, { description: 'Failed key attempts from one address before it is locked out.', env: 'RATE_LIMIT_MAX_ATTEMPTS' }),
        window_s: int(900, 1, 604_800, { description: 'Counting window and lockout duration in seconds.', env: 'RATE_LIMIT_WINDOW_SECONDS' }),
      },
      { additionalProperties: false, default: {} },
    ),
    cache: Type.Object(
      {
        ttl_s: int(300, 1, 86_400, { description: 'How long a validated key is cached.', env: 'CACHE_TTL_SECONDS' }),
        max_capacity: int(10_000, 1, 10_000_000, { description: 'Most keys held in the validation cache, in each gateway process: each `--workers` worker holds its own cache (N times the memory, and a miss per worker for each key).', env: 'CACHE_MAX_CAPACITY' }),
        negative_ttl_s: int(5, 0, 3600, { description: 'How long an unknown key is remembered as unknown.' }),
        negative_max: int(10_000, 0, 10_000_000, { description: 'Most unknown keys remembered, in each gateway process (each `--workers` worker remembers its own).' }),
        store_check_s: int(5, 0, 3600, {
          description:
            'How often a gateway reads from the store the keys changed since its last read (revoked, rotated, updated, expired, imported) and drops them from its cache: the bound on a change whose Redis message was lost, or made with Redis unreachable (0: never; the cache TTL is then the bound).',
        }),
      },
      { additionalProperties: false, default: {} },
    ),
    keys: Type.Object(
      {
        prefix: Type.String({ format: 'key-prefix', default: 'kg_', description: 'Prefix of generated keys. Changed alone, it refuses every key made before: list the old one in keys.previous_prefixes.' }),
        previous_prefixes: Type.Array(Type.String({ format: 'key-prefix' }), {
          default: [],
          maxItems: 16,
          uniqueItems: true,
          description: 'Prefixes of keys made before keys.prefix was changed: still accepted, never given to new keys (keys.prefix itself is refused here).',
        }),
        accept_legacy: Type.Boolean({ default: true, description: 'Accept imported legacy UUID v4 keys.' }),
        grace_hours: Type.Object(
          {
            system: int(72, 0, 8760, { description: 'Grace period of a rotated system key (hours).' }),
            user: int(24, 0, 8760, { description: 'Grace period of a rotated user key (hours).' }),
            service: int(48, 0, 8760, { description: 'Grace period of a rotated service key (hours).' }),
            integration: int(24, 0, 8760, { description: 'Grace period of a rotated integration key (hours).' }),
            emergency: int(0, 0, 8760, { description: 'Grace period of a rotated emergency key (hours).' }),
          },
          { additionalProperties: false, default: {} },
        ),
      },
      { additionalProperties: false, default: {} },
    ),
    store: Type.Object(
      {
        database_url: optStr('postgres-url', { description: 'PostgreSQL; without it the embedded store is used. A password in it given as the flag is visible in the process list, on the command line of each process keygate starts too; prefer the variable.', env: 'DATABASE_URL', flag: 'database-url', secret: true }),
        // Not only spaces, as not empty: `--data-dir "$DIR "` with DIR unset made a store in a folder named " " (found by a review).
        data_dir: Type.String({ minLength: 1, pattern: NAME_TEXT, default: './.keygate', description: 'Folder of the embedded store.', env: 'KEYGATE_DATA_DIR', flag: 'data-dir' }),
        pool_max: int(10, 1, 1000, { description: "PostgreSQL connections per process, for its statements; the health probes (/readyz, keygate_store_up) have one more of their own." }),
        query_timeout_ms: int(5000, 0, 600_000, {
          description:
            'A statement to PostgreSQL not answered within this fails with store_unavailable (503): PostgreSQL cancels it, and a connection that answers nothing at all is dropped a second later. 0: no limit. Migrations run without it. The wait for a connection before the statement (a new one, or a free one of store.pool_max) is bounded apart, at 5 s, whatever this says.',
        }),
        start_wait_s: int(60, 0, 3600, {
          description:
            "How long `serve` waits at start for a PostgreSQL that is not up yet (the connection refused, reset or timed out, its host name not resolved, or PostgreSQL starting up or out of connections), trying again every second and warning every 10 s, before it gives up (exit 1). 0: give up at once. A wrong password or database name ends the start at once; the CLI's commands never wait. It does not bound the wait for another instance's migrations (their lock), nor for a table a migration changes that another session's transaction holds, nor (store.auto_migrate on or off) for an operator's lock on keygate_migrations: each lasts as long as what it waits for, through a lock_timeout set on keygate's role or database, or a deadlock PostgreSQL breaks by ending the migration's statement, too.",
        }),
        auto_migrate: Type.Boolean({ default: true, description: 'Apply pending migrations on start (safe with several instances); off: run `keygate migrate`, on the embedded store as on PostgreSQL (serve and the other commands refuse a store that lacks migrations, and make no new embedded store).', env: 'KEYGATE_AUTO_MIGRATE' }),
        embedded_shared_buffers_mb: int(128, 16, 1024, {
          description:
            "PostgreSQL's shared_buffers of the embedded store, in MiB (PostgreSQL's own default is 128). It is most of what the store adds to `serve`'s memory: about 400 MiB resident at 128, 270 at 16, for a store of a few keys, once started; starting takes more for a moment (a peak of 0.75 to 0.9 GiB, and 1.1 GiB at the first start, which makes the store): size a memory limit by the peak. Reads past it come from the data folder's files, through the system's page cache. Commands other than `serve` use 16.",
          env: 'KEYGATE_EMBEDDED_SHARED_BUFFERS_MB',
        }),
      },
      { additionalProperties: false, default: {} },
    ),
    redis: Type.Object(
      {
        url: optStr('redis-url', { description: 'Redis for shared limits, invalidation and alerts.', env: 'REDIS_URL', secret: true }),
        key_prefix: Type.String({
          format: 'redis-prefix',
          default: '',
          description:
            'Put before every key and pub/sub channel keygate uses in Redis, as it is (include its separator), the anomaly channel included (`staging:` makes `staging:keygate:lockout:...` and `staging:keygate:anomaly:alerts`): deployments that share one Redis server, each with its own prefix, share no limit, lockout, invalidation or alert. A Redis database number (`redis://host/5`) does not part them: pub/sub ignores it.',
          env: 'KEYGATE_REDIS_KEY_PREFIX',
        }),
        anomaly_channel: Type.String({ format: 'redis-channel', default: 'keygate:anomaly:alerts', description: 'Pub/sub channel of anomaly alerts (the system keygate replaces used momentry:anomaly:alerts).', env: 'KEYGATE_ANOMALY_CHANNEL' }),
        command_timeout_ms: int(100, 5, 10_000, {
          description: 'A rate limit or lockout call to Redis slower than this is answered by the in-memory insurance limiter, which keeps answering until Redis takes a write (the health probe, every 250 ms) in time again.',
        }),
        invalidation_check_ms: int(1000, 0, 600_000, {
          description: 'How often a gateway compares the invalidation version counter in Redis with the last message it received, and flushes its key cache when messages were missed (0: never; the cache TTL still bounds staleness).',
        }),
      },
      { additionalProperties: false, default: {} },
    ),
    audit: Type.Object(
      {
        encryption_key: optStr('base64-32', { description: 'AES-256-GCM key of audit details and stored webhook signing secrets.', env: 'KEYGATE_ENCRYPTION_KEY', secret: true }),
        previous_encryption_keys: Type.Array(Type.String({ format: 'base64-32' }), {
          default: [],
          description: 'Earlier keys, still used to open older audit rows and webhook secrets.',
          env: 'KEYGATE_PREVIOUS_ENCRYPTION_KEYS',
          secret: true,
        }),
        retention_days: int(365, 1, 36_500, { description: 'Audit rows older than this are pruned.' }),
        seal_format: int(2, 1, 2, {
          description:
            'Format new audit rows are sealed in: 2 binds every field of the row (actor, address and time too); 1 binds the id, key id and action only, as versions before migration 0006 did. Set 1 on upgraded instances while instances of an older version still serve the admin API (they cannot open format 2 rows), then 2 once every instance is upgraded.',
          env: 'KEYGATE_AUDIT_SEAL_FORMAT',
        }),
      },
      { additionalProperties: false, default: {} },
    ),
    scheduler: Type.Object(
      {
        enabled: Type.Boolean({ default: true, description: 'Run the rotation scheduler and cleanup jobs in the admin process (one instance at a time holds the job lock).', env: 'KEYGATE_SCHEDULER' }),
        interval_s: int(60, 1, 86_400, { description: 'How often the jobs run.' }),
        rotation_notice_hours: int(168, 0, 8760, {
          description:
            'How long before a key must be rotated (created_at + rotation_interval_s) or expires it is announced as key.expiring (event and audit row). A rotation deadline is announced at least this long ahead: one the scheduler first sees with less time left is moved to this long from then. 0 announces no expiry, and a rotation deadline only as it passes, enforced at the round after.',
        }),
        anomaly_retention_days: int(90, 1, 36_500, { description: 'Anomaly rows older than this are pruned (when the table exists); at least anomalies.dedupe_window_s, as a pruned row no longer keeps its window from alerting again.' }),
        webhook_delivery_retention_days: int(30, 1, 36_500, { description: 'Webhook delivery log rows older than this are pruned (when the table exists), except deliveries still being retried.' }),
        usage_retention_days: int(400, 1, 36_500, {
          description: "Hourly usage and rejection counts (the admin reports, and each key's usual hours) older than this are pruned; at least anomalies.unusual_hour_history_days.",
        }),
      },
      { additionalProperties: false, default: {} },
    ),
    usage: Type.Object(
      {
        flush_interval_s: int(10, 1, 3600, { description: 'How often each gateway process adds its per-key request counts and rejections to the store (for the admin reports).' }),
      },
      { additionalProperties: false, default: {} },
    ),
    anomalies: Type.Object(
      {
        enabled: Type.Boolean({ default: true, description: 'Watch each key for the anomalies of SPEC §5 (gateway processes).', env: 'KEYGATE_ANOMALIES' }),
        check_interval_ms: int(1000, 20, 600_000, { description: 'How often a gateway process adds what it counted to the shared windows (Redis, else memory) and checks the thresholds; never on the request path.' }),
        dedupe_window_s: int(3600, 1, 604_800, { description: "One anomaly per key and type within a window of this length (one row, one alert, one webhook), windows aligned to the clock (the anomaly's window_start; at 3600, each hour from its start), so two can come moments apart, either side of a window's start." }),
        request_rate_per_min: int(1000, 1, 1_000_000_000, { description: 'More requests than this with one key within a minute is an anomaly.' }),
        error_rate_percent: int(50, 1, 100, {
          description:
            "More than this share of one key's requests answered with an error (status 400 or above) within error_rate_window_s is an anomaly (so 100, as no share is more than all, turns this check off). keygate's own answers to an outage (upstream_unavailable, upstream_timeout, store_unavailable, shutting_down, internal_error) count as requests, not errors: an upstream down would flag every key in use (before, found by a docs walk, this left them out).",
        }),
        error_rate_min_requests: int(20, 1, 1_000_000, { description: 'The error rate is judged only once a key made at least this many requests in the window.' }),
        error_rate_window_s: int(60, 10, 86_400, { description: 'Window of the error rate.' }),
        distinct_addresses_per_hour: int(5, 1, 999, { description: "More distinct client addresses than this using one key within an hour is an anomaly (a key's addresses are counted up to 1000 an hour)." }),
        unusual_hour_history_days: int(14, 1, 366, { description: "Days of a key's own hourly usage its usual hours are learnt from." }),
        unusual_hour_min_days: int(3, 0, 365, {
          description:
            "Days a key's history must span (from its first hourly usage row within unusual_hour_history_days, a rotated key's predecessors included) before its hours are judged: a young key has not yet used every hour it will (0: no span needed); less than unusual_hour_history_days, as the whole history spans its days only where the key was used at the judged hour's own time that many days before, so an hour it does not use would never be judged.",
        }),
        unusual_hour_min_requests: int(200, 1, 1_000_000_000, { description: 'Fewer requests than this in the history: too little to say what is unusual, no judgement.' }),
        unusual_hour_max_percent: int(1, 0, 100, { description: 'Activity in an hour of the day (UTC) that held at most this share of the history is unusual (0: only hours never used before).' }),
      },
      { additionalProperties: false, default: {} },
    ),
    webhooks: Type.Object(
      {
        allow_private: Type.Array(Type.String({ format: 'cidr' }), {
          default: [],
          description: 'Addresses a webhook may reach although they are loopback, private, link-local or otherwise internal (for internal receivers). Empty: only public addresses.',
          env: 'KEYGATE_WEBHOOK_ALLOW_PRIVATE',
        }),
        timeout_ms: int(10_000, 100, 120_000, { description: 'How long a receiver has to answer a delivery (its name looked up included); also how long a registration waits for the name to resolve.' }),
        max_attempts: int(8, 1, 100, { description: 'Attempts of one delivery before it is marked failed.' }),
        retry_base_ms: int(5000, 10, 3_600_000, { description: 'Wait before the second attempt; it doubles after each failure, up to retry_max_ms; at most retry_max_ms.' }),
        retry_max_ms: int(3_600_000, 10, 86_400_000, { description: "Longest wait between two attempts, a receiver's Retry-After (429, 503) included." }),
        poll_interval_ms: int(1000, 20, 600_000, { description: 'How often each process looks for due deliveries in the store.' }),
        rate_limit_debounce_s: int(60, 1, 86_400, {
          description:
            "rate_limit.exceeded is sent at most once per key in each window of this length, windows aligned to the clock (the event's window_start, one for every instance): two can come moments apart, either side of a window's start (before, found by a docs walk, this said at most once within this time).",
        }),
        secret_grace_hours: int(24, 0, 8760, { description: 'After a secret rotation the previous secret also signs deliveries (a second signature) for this long.' }),
      },
      { additionalProperties: false, default: {} },
    ),
    log: Type.Object(
      {
        level: Type.Union(['debug', 'info', 'warn', 'error'].map((l) => Type.Literal(l)), { default: 'info', description: 'Lowest level logged.', env: 'LOG_LEVEL' }),
        access_log: Type.Boolean({ default: false, description: 'One log line per gateway request, at info: a log.level of warn or error leaves them out.', env: 'KEYGATE_ACCESS_LOG' }),
      },
      { additionalProperties: false, default: {} },
    ),
    integrations: Type.Object(
      {
        gitea: Type.Object(
          {
            url: optStr('http-url', { description: 'Gitea base URL (a path prefix is kept).', env: 'GITEA_URL', flag: 'gitea-url' }),
            username: Type.Optional(Type.String({ minLength: 1, description: 'Gitea user whose basic credentials manage tokens.', env: 'GITEA_USERNAME', flag: 'gitea-username' })),
            password: Type.Optional(Type.String({ minLength: 1, description: 'Password of the Gitea user (a flag is visible in the process list; prefer the variable).', env: 'GITEA_PASSWORD', flag: 'gitea-password', secret: true })),
            timeout_ms: int(10_000, 100, 600_000, { description: 'Timeout of each Gitea request (connect, headers, body) in milliseconds.' }),
          },
          { additionalProperties: false, default: {} },
        ),
        n8n: Type.Object(
          {
            url: optStr('http-url', { description: 'n8n base URL.', env: 'N8N_URL', flag: 'n8n-url' }),
            email: Type.Optional(Type.String({ minLength: 3, description: 'Email of the n8n user whose session manages API keys.', env: 'N8N_EMAIL', flag: 'n8n-email' })),
            password: Type.Optional(Type.String({ minLength: 1, description: 'Password of the n8n user (a flag is visible in the process list; prefer the variable).', env: 'N8N_PASSWORD', flag: 'n8n-password', secret: true })),
            timeout_ms: int(10_000, 100, 600_000, { description: 'Timeout of each n8n request (connect, headers, body) in milliseconds.' }),
          },
          { additionalProperties: false, default: {} },
        ),
      },
      { additionalProperties: false, default: {} },
    ),
  },
  { additionalProperties: false },
)

export type Config = Static<typeof ConfigSchema>
export type RouteConfig = Static<typeof Route>
