"""Run a server until SIGTERM / SIGINT (or, for managed children, until stdin closes)."""

import argparse
import asyncio
import logging
import os
import signal


def add_common_arguments(parser):
    parser.add_argument("--log-level", default="WARNING",
                        help="logging level for messages on stderr (default WARNING)")
    # A LocalCluster keeps a pipe on each child's stdin: when the parent dies, the pipe
    # closes and the child exits instead of lingering.
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)


def configure_logging(level):
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def wait_for_stop(*, exit_on_stdin_eof=False):
    """Return when the process is asked to stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if exit_on_stdin_eof:
        def on_stdin():
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(0)
                stop.set()
        loop.add_reader(0, on_stdin)
    await stop.wait()


async def serve_until_stopped(server, args):
    """Serve until asked to stop, then close the server; the process's exit code."""
    try:
        await wait_for_stop(exit_on_stdin_eof=args.exit_on_stdin_eof)
    finally:
        await server.close()
    return 0
