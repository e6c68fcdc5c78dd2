-- Generated from plugin/config.py by `python -m token_meter_plugin.config`: do not edit.
-- The same table is what the plugin server prints for Kong's query (-dump).
return {
  name = "token-meter-log",
  fields = {
    { protocols = {
        type = "set",
        required = true,
        default = { "grpc", "grpcs", "http", "https" },
        elements = { type = "string", one_of = { "grpc", "grpcs", "http", "https" } },
        description = "A set of strings representing HTTP protocols.",
      } },
    { config = {
        type = "record",
        fields = {
          { collector_url = {
              type = "string",
              required = true,
              match_none = {
                { pattern = "^https?://%.", err = "a host name label must have 1 to 63 characters" },
                {
                  pattern = "^https?://[^/]*%.%.",
                  err = "a host name label must have 1 to 63 characters",
                },
                {
                  pattern = "^https?://[^/]*[^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:][^%./:]",
                  err = "a host name label must have 1 to 63 characters",
                },
                { pattern = "^https?://[^/]*:6553[6-9]", err = "the port must be at most 65535" },
                { pattern = "^https?://[^/]*:655[4-9]%d", err = "the port must be at most 65535" },
                { pattern = "^https?://[^/]*:65[6-9]%d%d", err = "the port must be at most 65535" },
                { pattern = "^https?://[^/]*:6[6-9]%d%d%d", err = "the port must be at most 65535" },
                {
                  pattern = "^https?://[^/]*:[7-9]%d%d%d%d",
                  err = "the port must be at most 65535",
                },
              },
              match_any = {
                patterns = {
                  "^https?://[%w%-%._]+$",
                  "^https?://[%w%-%._]+/[%w%-%._~!$&'()*+,;=:@/%%]*$",
                  "^https?://[%w%-%._]+:%d%d?%d?%d?%d?$",
                  "^https?://[%w%-%._]+:%d%d?%d?%d?%d?/[%w%-%._~!$&'()*+,;=:@/%%]*$",
                },
                err = "expected http:// or https://, a host name or IPv4 address, an optional port and an optional path, e.g. http://collector:8787",
              },
              description = "Base URL of the token-meter collector: `http://` or `https://`, a host name or IPv4 address (not an IPv6 literal), an optional port and path, e.g. `http://collector:8787`. Usage events are posted to `<collector_url>/v1/events` and the blocklist is read from `<collector_url>/v1/blocklist`.",
            } },
          { collector_token = {
              type = "string",
              required = true,
              match_all = {
                { pattern = "^[!-~]+$", err = "expected printable ASCII characters without spaces" },
              },
              referenceable = true,
              encrypted = true,
              description = "The collector's ingest token, sent as `Authorization: Bearer <token>`: printable ASCII without spaces. Referenceable: use a Kong vault reference such as `{vault://env/token-meter-ingest-token}`.",
            } },
          { collector_ca_bundle = {
              type = "string",
              match_all = {
                {
                  pattern = "^/[^%c]*$",
                  err = "expected an absolute path without control characters",
                },
              },
              description = "Absolute path of a PEM file of the certificate authorities that an `https://` `collector_url` is verified against, on the plugin server's host. Unset: the system's certificate authorities. The collector's certificate must name the URL's host.",
            } },
          { consumer_identifier = {
              type = "string",
              default = "username",
              one_of = { "username", "id", "custom_id" },
              description = "Which field of the authenticated Kong consumer identifies the customer in usage events and on the blocklist. A consumer without that field is identified by its `id`.",
            } },
          { max_batch_size = {
              type = "integer",
              default = 1000,
              between = { 1, 10000 },
              description = "Maximum number of usage events sent to the collector in one request (the collector takes at most 10000).",
            } },
          { max_coalescing_delay = {
              type = "number",
              default = 0.2,
              between = { 0, 3600 },
              description = "Maximum time in seconds an event waits for others to fill a batch before the batch is sent; 0 sends whatever is waiting at once. Kept well under a second so the collector can block a consumer promptly.",
            } },
          { max_entries = {
              type = "integer",
              default = 100000,
              between = { 1, 1000000 },
              description = "Maximum number of usage events cached in memory per collector and plugin-server process, in front of the journal; older unsent events are read back from disk. No event is dropped for age.",
            } },
          { initial_retry_delay = {
              type = "number",
              default = 0.1,
              gt = 0,
              between = { 0, 3600 },
              description = "Time in seconds before the first retry of a batch the collector did not accept, or of a failed blocklist poll; the delay doubles on each further retry up to `max_retry_delay`.",
            } },
          { max_retry_delay = {
              type = "number",
              default = 30,
              gt = 0,
              between = { 0, 3600 },
              description = "Maximum time in seconds between two retries of a batch; it caps every delay, `initial_retry_delay` included. Retries never stop: events wait in memory and then in the journal until the collector accepts them. A failed blocklist poll is retried within 5 seconds whatever this is.",
            } },
          { timeout = {
              type = "number",
              default = 10,
              gt = 0,
              between = { 0, 3600 },
              description = "Timeout in seconds of each request to the collector (connect, send and read). A blocklist long poll is given this long beyond the time the collector may hold it.",
            } },
          { spool_dir = {
              type = "string",
              match_all = {
                {
                  pattern = "^/[^%c]*$",
                  err = "expected an absolute path without control characters",
                },
              },
              description = "Absolute path of the journal's directory: every usage event is written there before the request goes on, and stays until the collector accepted it, so a crash, restart or collector outage loses nothing. Each plugin server uses its own subdirectory. Unset: `<Kong prefix>/token-meter-spool`. Put it on a persistent volume.",
            } },
          { spool_max_bytes = {
              type = "integer",
              default = 8589934592,
              between = { 1048576, 70368744177664 },
              description = "Maximum size of the journal in bytes, from 1 MiB to 64 TiB (default 8 GiB: days of a busy gateway's events while the collector is unreachable). Past it, each event that cannot be stored is counted and logged as an error.",
            } },
          { blocklist_max_stale = {
              type = "number",
              default = 60,
              between = { 1, 86400 },
              description = "Age in seconds past which the local copy of the collector's blocklist is stale; what happens then is decided by `fail_open`. The plugin long-polls the collector for changes, each poll held at most half this long and at most 30 seconds, so a quiet poll never makes the list stale.",
            } },
          { fail_open = {
              type = "boolean",
              default = true,
              description = "When the blocklist is stale (the collector unreachable), let every consumer not known to be blocked through (true) or answer every request as blocked (false).",
            } },
          { max_body_size = {
              type = "integer",
              default = 33554432,
              between = { 1, 1073741824 },
              description = "Maximum size in bytes of a body the plugin reads, at most 1 GiB: an upstream response body (after decompression) larger than this is recorded with `usage_missing`, and a request body declared larger is not read for stream-usage injection.",
            } },
          { source = {
              type = "string",
              len_max = 512,
              description = "CloudEvents `source` of the usage events, at most 512 bytes: identifies this data plane, and with the request id makes the collector's dedupe key. Unset: `kong://<hostname>`, the plugin server's host name.",
            } },
        },
      } },
  },
}
