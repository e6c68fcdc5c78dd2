"""Ingest: usage events in, validated, deduplicated and stored with their rollups."""
