"""token-meter collector: ingest, metering, blocklist and (later) billing for AI token usage."""
