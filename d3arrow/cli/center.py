"""d3arrow-center: run the metadata server (which worker holds which key, who is alive)."""

import argparse
import sys

from ..center import HEARTBEAT_TIMEOUT, HEARTBEATS_PER_SECOND, Center
from ..core import HEARTBEAT_INTERVAL
from ..eventloop import run
from .serving import (add_common_arguments, configure_logging, security_from_args,
                      serve_until_stopped)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="d3arrow-center", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="port to bind, 0 for any free one "
                        "(default 8787)")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL,
                        help="seconds between worker heartbeats (default %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT,
                        help="drop a worker silent this many seconds (default %(default)s)")
    parser.add_argument("--heartbeats-per-second", type=float, default=HEARTBEATS_PER_SECOND,
                        help="at most this many worker heartbeats a second: beyond, workers "
                             "beat less often and the timeout grows with their interval "
                             "(default %(default)s)")
    parser.add_argument("--http-port", type=int, default=0,
                        help="serve the status page, /status.json, /metrics (Prometheus) and "
                             "/health on this port of --host: 0 for none (default), -1 for "
                             "any free one")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    return run(_serve(args, security_from_args(parser, args)))


async def _serve(args, security):
    center = Center(heartbeat_interval=args.heartbeat_interval,
                    heartbeat_timeout=args.heartbeat_timeout, security=security,
                    heartbeats_per_second=args.heartbeats_per_second)
    try:
        await center.start(args.host, args.port, http_port=(
            None if args.http_port == 0 else max(args.http_port, 0)))
    except OSError as e:  # also unreadable TLS files, or a public address without a token
        print(f"Cannot start center on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    if center.dashboard_address:  # before the address line, which LocalCluster waits for
        print(f"Status page at {center.dashboard_address}", flush=True)
    print(f"Started center at {center.address}", flush=True)
    return await serve_until_stopped(center, args)


if __name__ == "__main__":
    sys.exit(main())
