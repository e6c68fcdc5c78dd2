-- Generated from plugin/config.py by `python -m token_meter_plugin.config`: do not edit.
-- The same declaration is what the plugin server prints for Kong's query (-dump).
local typedefs = require "kong.db.schema.typedefs"

return {
  name = "token-meter-log",
  fields = {
    { protocols = typedefs.protocols_http },
    { config = {
        type = "record",
        fields = {
          { collector_url = { type = "string", required = true, description = "Base URL of the token-meter collector, e.g. `http://collector:8787`. Usage events are posted to `<collector_url>/v1/events` and the blocklist is read from `<collector_url>/v1/blocklist`." } },
          { collector_token = { type = "string", required = true, referenceable = true, encrypted = true, description = "The collector's ingest token, sent as `Authorization: Bearer <token>`. Referenceable: use a Kong vault reference such as `{vault://env/token-meter-ingest-token}`." } },
          { consumer_identifier = { type = "string", default = "username", one_of = { "username", "id", "custom_id" }, description = "Which field of the authenticated Kong consumer identifies the customer in usage events and on the blocklist. A consumer without that field is identified by its `id`." } },
          { max_batch_size = { type = "integer", default = 1000, between = { 1, 10000 }, description = "Maximum number of usage events sent to the collector in one request." } },
          { max_coalescing_delay = { type = "number", default = 0.2, between = { 0, 3600 }, description = "Maximum time in seconds an event waits for others to fill a batch before the batch is sent. Kept well under a second so the collector can block a consumer promptly." } },
          { max_entries = { type = "integer", default = 100000, gt = 0, description = "Maximum number of usage events held in memory per plugin-server process; past it, events spill to the spool directory on disk. No event is dropped for age." } },
          { initial_retry_delay = { type = "number", default = 0.1, gt = 0, description = "Time in seconds before the first retry of a batch the collector did not accept; the delay doubles on each further retry up to `max_retry_delay`." } },
          { max_retry_delay = { type = "number", default = 30, gt = 0, description = "Maximum time in seconds between two retries of a batch. Retries never stop: events wait in memory and then in the spool until the collector accepts them." } },
          { timeout = { type = "number", default = 10, gt = 0, description = "Timeout in seconds of each request to the collector (connect, send and read)." } },
          { spool_dir = { type = "string", description = "Directory of the journal: every usage event is written there before the request goes on, and stays until the collector accepted it, so a crash, restart or collector outage loses nothing. Each plugin server uses its own subdirectory. Unset: `<Kong prefix>/token-meter-spool`. Put it on a persistent volume." } },
          { spool_max_bytes = { type = "integer", default = 8589934592, gt = 0, description = "Maximum size of the journal in bytes (default 8 GiB: days of a busy gateway's events while the collector is unreachable). Past it, each event that cannot be stored is counted and logged as an error." } },
          { blocklist_max_stale = { type = "number", default = 60, gt = 0, description = "Age in seconds past which the local copy of the collector's blocklist is considered stale; what happens then is decided by `fail_open`." } },
          { fail_open = { type = "boolean", default = true, description = "When the blocklist is stale (the collector unreachable), let every consumer through (true) or answer every request as blocked (false)." } },
          { max_body_size = { type = "integer", default = 33554432, gt = 0, description = "Maximum size in bytes of a body the plugin reads: an upstream response body (after decompression) larger than this is recorded with `usage_missing`, and a request body declared larger is not read for stream-usage injection." } },
          { source = { type = "string", description = "CloudEvents `source` of the usage events: identifies this data plane, and with the request id makes the collector's dedupe key. Unset: `kong://<hostname>`." } },
        },
      },
    },
  },
}
