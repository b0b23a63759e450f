"""d3arrow: the umbrella command (d3arrow demo, status, center, worker)."""

import argparse
import sys

from .serving import add_version_argument


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="d3arrow", description=__doc__)
    add_version_argument(parser)
    parser.add_argument("command", choices=["demo", "status", "center", "worker"],
                        help="demo: run the seed's Pool example on a local cluster; "
                             "status CENTER: the cluster's workers and totals; "
                             "center / worker: same as d3arrow-center / d3arrow-worker")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "center":
        from .center import main as run
    elif args.command == "worker":
        from .worker import main as run
    elif args.command == "status":
        from .status import main as run
    else:
        from .demo import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
