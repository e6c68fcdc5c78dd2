"""Kong's side of the plugin-server protocol, a fake collector and a faulty plugin, for tests
and benchmarks (see kong.py)."""
