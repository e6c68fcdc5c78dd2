"""The plugin servers Kong starts: `token-meter-plugin` and `token-meter-log-plugin`.

Each is a dedicated kong-pdk server for one plugin (Kong 3.9 keeps only the first plugin a
server reports), with kong-pdk's embedded-server flags and Kong's defaults:

    token-meter-plugin -dump                       # Kong's query command: plugin info as JSON
    token-meter-plugin [-p PREFIX] [--socket-name NAME] [-g] [-v] [--no-supervisor]

The process Kong starts is a supervisor (plugin/supervisor.py) that binds the socket and runs the
serving process, this module's `serve`, on the inherited listening descriptor: a serving process
that dies is replaced while Kong's connects wait in the backlog. `--no-supervisor` serves in the
process Kong started, binding the socket itself, as before. This module imports kong-pdk, gevent
and the plugin only in the serving process, so the supervisor stays small.

The socket is `<prefix>/<plugin name>.socket`, which is where Kong 3.9 looks by default
(kong-pdk would say `<name>.sock`, and the mismatch makes Kong spin: Kong/kong#9733). Served in
threading mode unless `-g`; `-m` is accepted for compatibility but ignored, because a process pool
loses the plugin's state and its background shipping (see docs/architecture.md). Handlers use
Python-style PDK returns: `--no-lua-style` is accepted and always in force.

The -dump path writes the JSON and nothing else to stdout (Kong JSON-decodes all of it); logs
go to stderr, which Kong joins into its error.log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from .config import (
    DEFAULT_KONG_PREFIX,
    PHASES,
    TOKEN_METER,
    TOKEN_METER_LOG,
    plugin_info,
    set_kong_prefix,
)
from .config import plugin_version as _plugin_version
from .supervisor import LISTEN_FD_OPTION, Supervisor

log = logging.getLogger("token_meter_plugin")

DEFAULT_PREFIX: Final = DEFAULT_KONG_PREFIX + "/"
SHUTDOWN_GRACE_S: Final = 6.0
# event_channel.HANDLER_TIMEOUT_S, repeated so that the supervisor does not import kong-pdk
# (tests/unit/test_supervisor.py checks that they agree).
HANDLER_TIMEOUT_S: Final = 50.0
# How the supervisor starts a serving process (plugin/serving.py), given the plugin's name, Kong's
# arguments and `--listen-fd N`.
SERVING_MODULE: Final = "token_meter_plugin.serving"

_shutdown_hooks: list[Callable[[], None]] = []
_shutdown_lock = threading.Lock()


STATS_INTERVAL_S: Final = 60.0


def start_stats_log(report: Callable[[], dict[str, Any]]) -> threading.Thread:
    """Log `plugin_stats` (delivery counters, journal size, lost events, parse errors) as one
    JSON line every STATS_INTERVAL_S: the plugin server's metrics, read from Kong's error.log."""

    def run() -> None:
        while True:
            time.sleep(STATS_INTERVAL_S)
            try:
                log.info("plugin_stats %s", json.dumps(report(), sort_keys=True))
            except Exception:
                log.exception("plugin_stats_failed")

    thread = threading.Thread(target=run, name="token-meter-stats", daemon=True)
    thread.start()
    return thread


def on_shutdown(hook: Callable[[], None]) -> None:
    """Run `hook` (bounded by SHUTDOWN_GRACE_S in all) before the server process exits."""
    _shutdown_hooks.append(hook)


def parse_args(plugin_name: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """kong-pdk's dedicated-server flags, with Kong's socket name as the default."""
    parser = argparse.ArgumentParser(
        prog=plugin_name, description=f"Kong plugin server for the {plugin_name} plugin."
    )
    parser.add_argument(
        "-p",
        "--kong-prefix",
        "-kong-prefix",
        dest="prefix",
        default=DEFAULT_PREFIX,
        help="directory of the Unix socket (Kong's prefix; default: %(default)s)",
    )
    parser.add_argument(
        "--socket-name",
        dest="socket_name",
        default=f"{plugin_name}.socket",
        help="socket file name inside the prefix (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    parser.add_argument(
        "--version", "-version", action="version", version=f"%(prog)s {_plugin_version()}"
    )
    parser.add_argument("--listen-queue-size", type=int, dest="listen_queue_size", default=4096)
    parser.add_argument(
        "--handler-timeout",
        type=float,
        dest="handler_timeout",
        default=HANDLER_TIMEOUT_S,
        help="seconds a handler waits for Kong's next Step before giving up (default: "
        "%(default)s, under Kong's 60 s lua_socket_read_timeout)",
    )
    parser.add_argument(
        "--no-lua-style",
        action="store_true",
        dest="no_lua_style",
        help="accepted for compatibility: Python-style PDK returns are always used",
    )
    parser.add_argument("--dump", "-dump", action="store_true", help="print plugin info as JSON")
    parser.add_argument(
        "--no-supervisor",
        action="store_true",
        dest="no_supervisor",
        help="serve in this process, binding the socket itself: no supervisor keeps the socket "
        "open while a new serving process starts",
    )
    # Given by the supervisor to the serving process: the listening socket it inherits.
    parser.add_argument(LISTEN_FD_OPTION, type=int, dest="listen_fd", help=argparse.SUPPRESS)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("-g", "--gevent", action="store_true", help="serve with gevent")
    modes.add_argument(
        "-m",
        "--multiprocessing",
        action="store_true",
        help="accepted for compatibility and ignored (threading mode is used)",
    )
    return parser.parse_args(argv)


def configure_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _exit_process(reason: str, code: int = 0) -> None:
    """Run the shutdown hooks once, then end the whole process (all threads)."""
    if not _shutdown_lock.acquire(blocking=False):
        return
    log.info("server_exiting reason=%s", reason)
    done = threading.Event()

    def run_hooks() -> None:
        for hook in _shutdown_hooks:
            try:
                hook()
            except Exception:
                log.exception("shutdown_hook_failed")
        done.set()

    threading.Thread(target=run_hooks, daemon=True).start()
    if not done.wait(SHUTDOWN_GRACE_S):
        log.error("shutdown_hooks_timeout seconds=%s", SHUTDOWN_GRACE_S)
    logging.shutdown()
    os._exit(code)


def serve(
    name: str,
    plugin_class: type[Any],
    *,
    argv: Sequence[str] | None = None,
    phases: Sequence[str] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Dump the plugin's info or serve it: kong-pdk's `start_dedicated_server`, guarded."""
    args = parse_args(name, argv)
    plugin = plugin_info(name) if info is None else info
    if args.dump:
        # Kong's query command JSON-decodes all of stdout: the JSON and nothing else.
        sys.stdout.write(json.dumps([plugin]))
        sys.stdout.flush()
        return

    configure_logging(args.verbose)
    if args.multiprocessing:
        log.warning("multiprocessing_mode_ignored reason=state_and_shipping_lost_per_event")
    check_args(args)
    set_kong_prefix(args.prefix)

    from kong_pdk.module import Module  # noqa: PLC0415 (the serving process only)

    from . import rpc  # noqa: PLC0415
    from .plugin_server import GuardedPluginServer  # noqa: PLC0415

    ps = GuardedPluginServer(
        name=f"{name} version {plugin['Version']}",
        use_gevent=args.gevent,
        handler_timeout=args.handler_timeout,
    )

    class _Definition:
        Plugin = plugin_class
        Schema = plugin["Schema"]["fields"][-1]["config"]["fields"]
        version = plugin["Version"]
        priority = plugin["Priority"]

    module = Module(name, module=_Definition)
    if phases is not None:
        module.phases = list(phases)
    ps.plugins[name] = module

    # Looked up on the module when serving: a test plugin may have put a subclass there.
    server = rpc.GuardedRpcServer(
        ps,
        args.prefix,
        socket_name=args.socket_name,
        use_gevent=args.gevent,
        listen_queue_size=args.listen_queue_size,
        on_parent_exit=_exit_process,
        listen_fd=args.listen_fd,
    )

    def cleanup_socket() -> None:
        Path(server.path).unlink(missing_ok=True)

    if args.listen_fd is None:
        on_shutdown(cleanup_socket)  # an inherited socket is the supervisor's to remove

    # Kong stops its plugin servers with SIGTERM: flush what the hooks hold, then exit. The same
    # handler in both modes: a signal also wakes the gevent hub, whose loop then runs Python's
    # pending signal handlers (the SIGTERM test stops a server of each mode).
    def on_term(*_: Any) -> None:
        threading.Thread(target=_exit_process, args=("SIGTERM",), daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    try:
        server.serve_forever()
    finally:
        _exit_process("serve_forever returned", 1)


def check_args(args: argparse.Namespace) -> None:
    """Refuse, logged, what would make every serving process exit at once."""
    if not Path(args.prefix).is_dir():
        log.error("prefix_missing path=%s", args.prefix)
        raise SystemExit(1)
    if not 0 < args.handler_timeout <= HANDLER_TIMEOUT_S:
        log.error(
            "handler_timeout_invalid value=%s max=%s", args.handler_timeout, HANDLER_TIMEOUT_S
        )
        raise SystemExit(2)


def serve_plugin(name: str, argv: Sequence[str]) -> None:
    """Serve one of the two plugins in this process (the serving process, or --no-supervisor)."""
    # Imported here, not at the top: the handler pulls in the whole plugin, which the supervisor
    # and `serve` for another plugin class (the benchmark's baseline, the defect tests' faulty
    # plugin) need not.
    from . import handler  # noqa: PLC0415

    plugin_class = handler.TokenMeter if name == TOKEN_METER else handler.TokenMeterLog
    on_shutdown(handler.shutdown)
    start_stats_log(handler.stats)
    serve(name, plugin_class, argv=argv, phases=PHASES[name])


def main(name: str, argv: Sequence[str] | None = None) -> None:
    """What Kong starts: the plugin info (`-dump`), or a supervisor and its serving process."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(name, arguments)
    if args.dump:
        # Kong's query command JSON-decodes all of stdout: the JSON and nothing else.
        sys.stdout.write(json.dumps([plugin_info(name)]))
        sys.stdout.flush()
        return
    if args.no_supervisor or args.listen_fd is not None:
        serve_plugin(name, arguments)
        return
    configure_logging(args.verbose)
    check_args(args)
    supervisor = Supervisor(
        plugin=name,
        socket_path=Path(args.prefix) / args.socket_name,
        backlog=args.listen_queue_size,
        serving_argv=[sys.executable, "-m", SERVING_MODULE, name, *arguments],
    )
    raise SystemExit(supervisor.run())


def main_token_meter(argv: Sequence[str] | None = None) -> None:
    """Console script `token-meter-plugin`: phases access and response."""
    main(TOKEN_METER, argv)


def main_token_meter_log(argv: Sequence[str] | None = None) -> None:
    """Console script `token-meter-log-plugin`: phases access and log."""
    main(TOKEN_METER_LOG, argv)


__all__ = [
    "SERVING_MODULE",
    "check_args",
    "main",
    "main_token_meter",
    "main_token_meter_log",
    "on_shutdown",
    "parse_args",
    "serve",
    "serve_plugin",
]
