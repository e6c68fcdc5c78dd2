"""Kong's side of the plugin-server protocol (kong.py), a fake collector (collector.py), a faulty
plugin (faulty_plugin.py) and where to find the programs they start (paths.py), for tests and
benchmarks; and the fakes of outside services, which the Docker demo runs too: Stripe (stripe/)
and an OpenAI-compatible upstream (openai_upstream.py)."""
