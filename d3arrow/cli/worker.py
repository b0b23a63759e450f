"""d3arrow-worker CENTER: run a worker that registers with the center at CENTER (host:port)."""

import argparse
import sys

from ..addressing import normalize_address
from ..errors import CommClosedError
from ..eventloop import run
from ..worker import Worker
from .serving import (add_common_arguments, configure_logging, security_from_args,
                      serve_until_stopped)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="d3arrow-worker", description=__doc__)
    parser.add_argument("center", help="the center's address, host:port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="port to bind (default 0: any free port)")
    parser.add_argument("--ncores", type=int, default=None,
                        help="threads that run user functions (default: all cores)")
    parser.add_argument("--name", default=None, help="a name shown by the center")
    parser.add_argument("--no-shm", action="store_true",
                        help="no shared-memory store: exchange every value over TCP")
    parser.add_argument("--shm-size", type=parse_size, default=None,
                        help="bytes of shared memory at most, e.g. 4G or 512M "
                             "(default: a quarter of this machine's memory)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        center = normalize_address(args.center)
    except ValueError as e:
        parser.error(str(e))
    return run(_serve(args, center, security_from_args(parser, args)))


async def _serve(args, center, security):
    worker = Worker(center, ncores=args.ncores, name=args.name, shm=not args.no_shm,
                    shm_size=args.shm_size, security=security)
    try:
        await worker.listen(args.host, args.port)
    except OSError as e:  # also unreadable TLS files, or a public address without a token
        await worker.close(report=False)
        print(f"Cannot start worker on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"Start worker at {worker.address}", flush=True)
    try:
        await worker.register_with_center()
    except (OSError, TimeoutError, CommClosedError) as e:  # AuthenticationError is an OSError
        print(f"Cannot register with center at {center}: {e}", file=sys.stderr)
        await worker.close(report=False)
        return 1
    print(f"Register with center at {center}", flush=True)
    return await serve_until_stopped(worker, args)


def parse_size(text):
    """'1073741824', '1G', '512M', '64k' -> bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    given = text
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text and text[-1] in units:
            size = int(float(text[:-1]) * units[text[-1]])
        else:
            size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {given!r} (try 4G, 512M)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{given!r}: a store needs a positive size (or "
                                         f"--no-shm for none)")
    return size


if __name__ == "__main__":
    sys.exit(main())
