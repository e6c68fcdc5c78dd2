"""Kong's side of the plugin-server protocol (kong.py), a fake collector (collector.py), a faulty
plugin (faulty_plugin.py) and where to find the programs they start (paths.py), for tests and
benchmarks."""
