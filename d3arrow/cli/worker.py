"""``d3arrow-worker CENTER_ADDR``: run a worker that registers with the center."""

import argparse
import sys

from ..addressing import normalize_address
from ..errors import CommClosedError
from ..eventloop import run
from ..worker import Worker
from .serving import add_common_arguments, configure_logging, serve_until_stopped


def main(argv=None):
    parser = argparse.ArgumentParser(prog="d3arrow-worker", description=__doc__)
    parser.add_argument("center", help="the center's address, host:port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="port to bind (default 0: any free port)")
    parser.add_argument("--ncores", type=int, default=None,
                        help="threads that run user functions (default: all cores)")
    parser.add_argument("--name", default=None, help="a name shown by the center")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        center = normalize_address(args.center)
    except ValueError as e:
        parser.error(str(e))
    return run(_serve(args, center))


async def _serve(args, center):
    worker = Worker(center, ncores=args.ncores, name=args.name)
    try:
        await worker.listen(args.host, args.port)
    except OSError as e:
        print(f"Cannot start worker on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"Start worker at {worker.address}", flush=True)
    try:
        await worker.register_with_center()
    except (OSError, TimeoutError, CommClosedError) as e:
        print(f"Cannot register with center at {center}: {e}", file=sys.stderr)
        await worker.close(report=False)
        return 1
    print(f"Register with center at {center}", flush=True)
    return await serve_until_stopped(worker, args)


if __name__ == "__main__":
    sys.exit(main())
