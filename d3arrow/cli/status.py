"""d3arrow status: the cluster's workers and totals, as its center sees them."""

import argparse
import json
import sys

from ..metadata import center_address, center_rpc, close_center_rpc
from ..core import DEFAULT_TIMEOUT, ConnectionPool
from ..errors import CommClosedError
from ..eventloop import run
from ..security import TOKEN_ENV, Security


def main(argv=None):
    parser = argparse.ArgumentParser(prog="d3arrow status", description=__doc__)
    parser.add_argument("center", help="the center's address, host:port (or a Redis URL, "
                        "redis://host:port/db, where the metadata lives there)")
    parser.add_argument("--json", action="store_true", help="print the whole status as JSON "
                        "(what Pool.status() returns and the center serves as /status.json)")
    parser.add_argument("--auth-token", default=None,
                        help=f"the cluster's token (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-cert", default=None)
    parser.add_argument("--tls-key", default=None)
    parser.add_argument("--tls-ca", default=None)
    args = parser.parse_args(argv)
    try:
        center = center_address(args.center)
        security = Security.from_options(args.auth_token, args.tls_cert, args.tls_key,
                                         args.tls_ca)
    except ValueError as e:
        parser.error(str(e))
    try:
        status = run(_ask(center, security))
    except (OSError, TimeoutError, CommClosedError) as e:
        print(f"d3arrow status: cannot get the status of {center}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else table(status))
    return 0


async def _ask(center, security):
    pool = ConnectionPool(security=security)
    try:
        rpc = center_rpc(pool, center, timeout=DEFAULT_TIMEOUT)
        identity = await rpc.identity()
        if identity.get("role") != "center":
            raise OSError(f"{center} is a {identity.get('role')}, not a center")
        status = await rpc.status()
    finally:
        pool.close()
        await close_center_rpc(center)
    status.pop("status", None)
    return status


def table(status):
    """The status as text: a row per worker, then the totals (like ``ray status``)."""
    header = ("worker", "name", "cores", "memory", "store", "spilled", "keys", "running",
              "tasks", "in/s", "out/s", "seen")
    rows = [header]
    for w in status["workers"]:
        g, c, r = w["gauges"], w["counters"], w["rates"]
        memory = _size(g.get("memory_bytes", 0))
        if g.get("memory_limit_bytes"):
            memory += f" / {_size(g['memory_limit_bytes'])}"
        rows.append((w["address"], w["name"] if w["name"] != w["address"] else "", w["ncores"],
                     memory + (" paused" if g.get("paused") else ""),
                     f"{_size(g.get('store_used_bytes', 0))} / "
                     f"{_size(g.get('store_capacity_bytes', 0))}",
                     _size(g.get("spilled_bytes", 0)), w["nkeys"], g.get("calls_running", 0),
                     c.get("tasks", 0), _per_second(r, "received"), _per_second(r, "sent"),
                     f"{w['last_seen']:.1f} s ago"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [f"center {status['center']}, up {status['uptime']:.0f} s"]
    lines += ["  ".join(str(v).ljust(n) if i < 2 else str(v).rjust(n)
                        for i, (v, n) in enumerate(zip(row, widths))).rstrip() for row in rows]
    t = status["totals"]
    lines.append(f"total: {t['workers']} workers, {t['ncores']} cores, {t['keys']} keys, "
                 f"{t['clients']} clients; {t['tasks']} tasks run ({t['tasks_failed']} failed), "
                 f"{t['tasks_per_second']:.0f}/s; memory {_size(t['memory_bytes'])}, store "
                 f"{_size(t['store_used_bytes'])} / {_size(t['store_capacity_bytes'])}, "
                 f"spilled {_size(t['spilled_bytes'])}")
    return "\n".join(lines)


def _per_second(rates, way):
    return _size(rates.get(f"bytes_{way}_tcp", 0) + rates.get(f"bytes_{way}_shm", 0)) + "/s"


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


if __name__ == "__main__":
    sys.exit(main())
