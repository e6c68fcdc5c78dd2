"""Stripe billing: the outbox of meter-event deltas, its one leader, and the status of both.

The only package that talks to Stripe (`stripe_api`); HTTP handlers and ingest never do. Ingest
tells it which rollup windows grew (`store.mark_dirty`, inside the ingest transaction); the sync
(`sync.StripeSync`) does the rest.
"""
