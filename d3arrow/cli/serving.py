"""Run a server until SIGTERM / SIGINT (or, for managed children, until stdin closes)."""

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys

from .. import __version__
from ..security import TOKEN_ENV, Security


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text):
    """An argparse type: a logging level's name, in any case."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level: choose from "
                                         f"{', '.join(LOG_LEVELS)}")
    return text.upper()


def add_version_argument(parser):
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def add_common_arguments(parser):
    add_version_argument(parser)
    parser.add_argument("--log-level", type=log_level, default="WARNING",
                        help="DEBUG, INFO (start, registration, workers joining and leaving, "
                             "failures and retries), WARNING (default), ERROR or CRITICAL")
    # A LocalCluster keeps a pipe on each child's stdin: when the parent dies, the pipe
    # closes and the child exits instead of lingering.
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    group = parser.add_argument_group("security")
    group.add_argument("--auth-token", default=None,
                       help=f"every connection must prove it knows this token (default: "
                            f"${TOKEN_ENV}; required to bind an address other than loopback). "
                            f"Prefer the variable: arguments are visible to other users")
    group.add_argument("--tls-cert", default=None, help="PEM certificate: serve and connect "
                       "over TLS")
    group.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    group.add_argument("--tls-ca", default=None, help="PEM CA bundle: verify peers against it "
                       "(mutual TLS: clients must present a certificate it signed)")


def security_from_args(parser, args):
    try:
        security = Security.from_options(args.auth_token, args.tls_cert, args.tls_key,
                                         args.tls_ca)
    except ValueError as e:
        parser.error(str(e))
    if security.token is None and not args.exit_on_stdin_eof:
        print(f"{parser.prog}: warning: no auth token: any user of this machine who can reach "
              f"the port can run code as {getpass.getuser()} (set ${TOKEN_ENV})",
              file=sys.stderr, flush=True)
    return security


def configure_logging(level):
    logging.basicConfig(level=level,
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


GRACE_SECONDS = 5.0  # on SIGTERM / SIGINT, requests being handled get this long to finish


async def serve_until_stopped(server, args):
    """Serve until asked to stop, then close the server gracefully; the exit code."""
    try:
        await wait_for_stop(exit_on_stdin_eof=args.exit_on_stdin_eof)
    finally:
        await server.close(grace=GRACE_SECONDS)
    return 0
