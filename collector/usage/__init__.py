"""Usage reports: what a consumer used in a period, from the rollups."""
