"""Serve the fake Stripe on its own, for the Docker demo's `stripe` profile:

    STRIPE_API_KEY=sk_test_... python -m tests.harness.stripe [--host 0.0.0.0] [--port 12111]
        [--customer cus_1 --customer cus_2 ...]

The key the fake accepts is STRIPE_API_KEY (default `sk_test_fake`, FakeStripe's own); each
`--customer` is seeded as an existing Stripe customer. It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .server import FakeStripe


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.stripe", description="A fake of the Stripe API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument(
        "--customer", action="append", default=[], help="seed a customer (repeatable)"
    )
    args = parser.parse_args(argv)
    fake = FakeStripe(
        os.environ.get("STRIPE_API_KEY") or "sk_test_fake", host=args.host, port=args.port
    )
    for customer in args.customer:
        fake.add_customer(customer)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with fake:
        sys.stderr.write(f"fake Stripe listening on {fake.url}\n")
        sys.stderr.flush()
        stop.wait()


if __name__ == "__main__":
    main()
