"""d3arrow-worker CENTER: run a worker that registers with the center at CENTER (host:port)."""

import argparse
import gc
import sys

from ..metadata import center_address, shown
from ..errors import CommClosedError
from ..eventloop import run
from ..memory import PAUSE, TARGET, parse_memory_limit
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
    memory = parser.add_argument_group("memory")
    memory.add_argument("--memory-limit", type=memory_limit, default=None,
                        help="bytes this worker may hold in memory: 4GiB, 512MB, 50%% (of "
                             "this machine), auto (all of it), 0 for no limit (default)")
    memory.add_argument("--memory-target", type=fraction, default=TARGET,
                        help=f"spill least recently used values to disk above this fraction "
                             f"of the limit (default {TARGET})")
    memory.add_argument("--memory-pause", type=fraction, default=PAUSE,
                        help=f"above this fraction of the limit, start no task and take no "
                             f"value until spilling made room (default {PAUSE})")
    memory.add_argument("--local-directory", default=None,
                        help="where to spill (default: the system's temporary directory); "
                             "files there have no name and vanish with the worker")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.memory_target > args.memory_pause:
        parser.error(f"--memory-target ({args.memory_target}) is above --memory-pause "
                     f"({args.memory_pause})")
    configure_logging(args.log_level)
    try:
        center = center_address(args.center)
    except ValueError as e:
        parser.error(str(e))
    return run(_serve(args, center, security_from_args(parser, args)))


async def _serve(args, center, security):
    try:
        worker = Worker(center, ncores=args.ncores, name=args.name, shm=not args.no_shm,
                        shm_size=args.shm_size, security=security,
                        memory_limit=args.memory_limit, local_directory=args.local_directory,
                        memory_target=args.memory_target, memory_pause=args.memory_pause)
    except ValueError as e:  # a local directory that is missing or not writable
        print(f"Cannot start worker: {e}", file=sys.stderr)
        return 1
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
        print(f"Cannot register with center at {shown(center)}: {e}", file=sys.stderr)
        await worker.close(report=False)
        return 1
    print(f"Register with center at {shown(center)}", flush=True)
    # what starting made (modules, the loop, the store) lives as long as the process: full
    # collections need not walk it again (one took 17-40 ms, holding up the loop and any
    # call on it, which it made look slow: see Function.record)
    gc.freeze()
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


def memory_limit(text):
    """An argparse type: bytes, or None for no limit."""
    try:
        return parse_memory_limit(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fraction(text):
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a fraction in (0, 1], e.g. 0.6")
    return value


if __name__ == "__main__":
    sys.exit(main())
