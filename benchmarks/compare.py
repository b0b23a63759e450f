"""One run, one table: the hardware limits, d3arrow, and dask.distributed / Ray /
multiprocessing.Pool where installed (``pip install -e ".[compare]"``).

    python -m benchmarks.compare [--quick] [--json results.json]

Each system runs in its own subprocess on 127.0.0.1 (2 worker processes, 1 thread each),
one after the other, on the same arrays and task counts. Throughputs are medians; ratios
compare figures from this one run.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from .same_host import fmt as _fmt, verdict as _verdict

MiB = 2**20

# "pairs": how many (socket, d3arrow) pairs the two targets stated against the socket take
# "spill": bytes of the spill-throughput figures; "pipeline": the 3x-memory pipeline
FULL = {"sizes": [8 * MiB, 256 * MiB], "big": 256 * MiB, "tiny": 10_000, "repeat": 5,
        "pairs": 7, "graphs": 3, "spill": 256 * MiB, "pipeline": True, "same_host": "full"}
QUICK = {"sizes": [8 * MiB], "big": 32 * MiB, "tiny": 2_000, "repeat": 3, "pairs": 3,
         "graphs": 0, "spill": 32 * MiB, "pipeline": False, "same_host": "quick"}
PIPELINE_SYSTEMS = ("d3arrow", "dask")
GRAPH_SYSTEMS = {"d3arrow": "d3arrow", "dask": "dask.distributed", "ray": "Ray"}
GRAPH_WORK = {"P1": "dask P1 (x + x.T).sum(axis=0), 12000^2, 1500^2 chunks",
              "P2": "dask P2 10,000 20x20 chunks, map_blocks, sum",
              "P3": "dask P3 1,000 delayed tasks in a chain"}
SYSTEMS = ["d3arrow", "dask", "ray", "multiprocessing"]
NEEDS = {"dask": "distributed", "ray": "ray"}


def rows(config):
    """(label, unit, key, limit key, higher is better) per line of the table."""
    big = config["big"]
    out = []
    for nbytes in config["sizes"]:
        out.append((f"task on B, {nbytes // MiB} MiB input on A, TCP", "GB/s",
                    f"task_input_tcp_{nbytes}", "socket", True))
        out.append((f"task on B, {nbytes // MiB} MiB input on A, same host", "GB/s",
                    f"task_input_shm_{nbytes}", "memcpy", True))
    out += [
        (f"scatter {big // MiB} MiB from the client", "GB/s", f"scatter_{big}", "socket", True),
        (f"gather {big // MiB} MiB to the client, TCP", "GB/s", f"gather_tcp_{big}", "socket",
         True),
        (f"gather {big // MiB} MiB to the client, same host", "GB/s", f"gather_shm_{big}",
         "memcpy", True),
        (f"{config['tiny']:,} tiny tasks", "tasks/s", "tiny_tasks_per_s", None, True),
        ("one tiny task, round trip", "ms", "round_trip_ms", None, False),
        (f"receiving worker peak RSS, {big // MiB} MiB", "x payload", f"peak_rss_{big}", None,
         False),
    ]
    if config.get("spill"):  # the limit column: dd to the same directory, same run
        size = config["spill"] // MiB
        out.append((f"spill write {size} MiB", "GB/s", "spill_write_gbps", "dd_write", True))
        out.append((f"spill read back {size} MiB", "GB/s", "spill_read_gbps", "dd_read", True))
    if config.get("pipeline"):
        out.append(("pipeline 48 x 128 MiB through 2 x 1 GiB workers", "s", "pipeline_s", None,
                    False))
        out.append(("  peak RSS of a worker (VmRSS)", "GiB", "pipeline_rss_gib", None, False))
        out.append(("  peak private memory of a worker", "GiB", "pipeline_private_gib", None,
                    False))
    if config.get("graphs"):  # the limit column: dask's threaded scheduler, same run
        for name, label in GRAPH_WORK.items():
            out.append((label, "s", f"graph_{name}_s", f"threaded_{name}", False))
            out.append(("  cluster peak RSS", "GiB", f"graph_{name}_gib", None, False))
        out.append(("submit chain of 1,000 tasks, script's function", "ms/task",
                    "submit_chain_ms", None, False))
        out.append(("submit chain of 1,000 tasks, importable function", "ms/task",
                    "submit_chain_importable_ms", None, False))
    return out


def run_system(name, config):
    """Figures of one system, measured in a subprocess: {key: value} or {"error": text}."""
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        return {"skipped": f"{NEEDS[name]} is not installed"}
    command = [sys.executable, "-m", "benchmarks.compare", "--system", name,
               "--config", json.dumps(config)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    figures = json.loads(lines[-1])
    figures["seconds"] = time.perf_counter() - start
    return figures


def measure_in_this_process(name, config):
    args = (config["sizes"], config["big"], config["tiny"], config["repeat"])
    if name == "d3arrow":
        from . import measure
        figures = measure.run(*args, pairs=config["pairs"])
    else:
        from . import peers
        figures = peers.SYSTEMS[name][1](*args)
    # the graphs first: the pipeline leaves memory fragmented (fewer huge pages) and the
    # page cache churned, which would slow what follows it
    if config.get("graphs") and name in GRAPH_SYSTEMS:
        from . import graphs
        found = graphs.figures(GRAPH_SYSTEMS[name], config["graphs"],
                               report=lambda text: print(text, file=sys.stderr, flush=True))
        figures.update(found)
        for work in GRAPH_WORK:
            figures[f"graph_{work}_gib"] = found[f"graph_{work}_rss"] / 2**30
    if config.get("spill") and name == "d3arrow":
        import tempfile

        from . import spill
        figures.update(spill.spill_figures(tempfile.gettempdir(), config["spill"],
                                           config["repeat"]))
    if config.get("pipeline") and name in PIPELINE_SYSTEMS:
        from . import spill
        found = spill.pipeline(name)
        figures.update(pipeline_s=found["seconds"], pipeline_runs=found["runs"],
                       pipeline_rss_gib=max(found["peak_rss"]) / 2**30,
                       pipeline_private_gib=max(found["peak_private"]) / 2**30,
                       pipeline_restarted=found["restarted"])
    return figures


def targets(results, config):
    """The issue's targets: (statement, measured, met)."""
    d3, dask = results["systems"]["d3arrow"], results["systems"].get("dask", {})
    socket, big = results["limits"]["socket"], config["big"]
    small = config["sizes"][0]
    out = []

    def add(text, value, met):
        out.append({"target": text, "measured": value, "met": met})

    tcp_big = d3.get(f"task_input_tcp_{big}")
    if tcp_big:
        paired = d3.get(f"task_input_tcp_{big}_per_socket")
        add(f"TCP worker-to-worker {big // MiB} MiB >= 0.9 x raw socket",
            f"{paired:.2f}, median of {_pairs(d3, f'task_input_tcp_{big}')} "
            f"({tcp_big / socket:.2f} against the run-start socket)", paired >= 0.9)
        if f"task_input_tcp_{big}" in dask:
            ratio = tcp_big / dask[f"task_input_tcp_{big}"]
            add(f"TCP worker-to-worker {big // MiB} MiB no slower than dask", f"{ratio:.2f}x",
                ratio >= 1)
    if f"task_input_tcp_{small}" in dask and f"task_input_tcp_{small}" in d3:
        ratio = d3[f"task_input_tcp_{small}"] / dask[f"task_input_tcp_{small}"]
        add(f"TCP worker-to-worker {small // MiB} MiB >= 3 x dask", f"{ratio:.2f}x", ratio >= 3)
    if f"scatter_{big}" in d3:
        paired = d3[f"scatter_{big}_per_socket"]
        add(f"scatter {big // MiB} MiB >= 0.8 x raw socket",
            f"{paired:.2f}, median of {_pairs(d3, f'scatter_{big}')} "
            f"({d3[f'scatter_{big}'] / socket:.2f} against the run-start socket)", paired >= 0.8)
    if f"peak_rss_{big}" in d3:
        add("receiving worker peak RSS growth <= 1.1 x payload", f"{d3[f'peak_rss_{big}']:.2f}",
            d3[f"peak_rss_{big}"] <= 1.1)
    if "tiny_tasks_per_s" in d3:
        add("Pool.map of tiny tasks >= 10,000 tasks/s", f"{d3['tiny_tasks_per_s']:,.0f}",
            d3["tiny_tasks_per_s"] >= 10_000)
    if "round_trip_ms" in d3:
        add("one tiny apply round trip < 1 ms", f"{d3['round_trip_ms']:.2f} ms",
            d3["round_trip_ms"] < 1)
    limits = results["limits"]
    for work, faster, threaded in (("P1", 1.6, 1.25), ("P2", 10, 1.0), ("P3", 6, None)):
        ours, theirs = d3.get(f"graph_{work}_s"), dask.get(f"graph_{work}_s")
        if ours and theirs:
            add(f"dask {work} >= {faster}x faster than dask.distributed",
                f"{theirs / ours:.2f}x", theirs / ours >= faster)
        if ours and threaded and limits.get(f"threaded_{work}"):
            ratio = ours / limits[f"threaded_{work}"]
            add(f"dask {work} within {threaded}x of dask threaded", f"{ratio:.2f}x",
                ratio <= threaded)
    if "spill_write_gbps" in d3:
        for way in ("write", "read"):
            ratio = d3[f"spill_{way}_gbps"] / limits[f"dd_{way}"]
            add(f"spill {way} >= 0.8 x dd to the same directory", f"{ratio:.2f}x", ratio >= 0.8)
    if "pipeline_s" in d3 and "pipeline_s" in dask:
        ratio = dask["pipeline_s"] / d3["pipeline_s"]
        add("pipeline of 3x the workers' memory >= 1.5x faster than dask.distributed, no "
            "worker restarted", f"{ratio:.2f}x, restarted: d3arrow "
            f"{d3['pipeline_restarted']}, dask {dask['pipeline_restarted']}",
            ratio >= 1.5 and not d3["pipeline_restarted"])
    if "submit_chain_ms" in d3:
        add("pool.submit chain <= 1 ms a task", f"{d3['submit_chain_ms']:.2f} ms",
            d3["submit_chain_ms"] <= 1)
    return out


def _pairs(figures, name):
    """The paired ratios behind a ``*_per_socket`` figure, as text."""
    return "paired ratios " + " ".join(f"{r:.2f}" for r in figures[f"{name}_per_socket_pairs"])


def print_table(results, config):
    limits, systems = results["limits"], results["systems"]
    peers = [s for s in SYSTEMS[1:] if "skipped" not in systems[s] and "error" not in systems[s]]
    header = ["measure", "unit", "limit", "d3arrow"] + peers + ["d3arrow/limit"] + [
        f"d3arrow vs {p}" for p in peers]
    table = [header]
    for label, unit, key, limit_key, higher in rows(config):
        d3 = systems["d3arrow"].get(key)
        limit = limits.get(limit_key) if limit_key else None
        line = [label, unit, _fmt(limit), _fmt(d3)] + [_fmt(systems[p].get(key)) for p in peers]
        line.append(f"{d3 / limit:.2f}" if d3 and limit else "")
        for p in peers:
            other = systems[p].get(key)
            line.append(f"{(d3 / other if higher else other / d3):.1f}x" if d3 and other else "")
        table.append(line)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print(" | ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                         for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print(f"\nlimits: raw loopback socket {limits['socket']:.2f} GB/s, memcpy "
          f"{limits['memcpy']:.2f} GB/s ({config['big'] // MiB} MiB, this run). 'vs': how many "
          "times better d3arrow did (throughput ratio, or the peer's time over d3arrow's).")
    for name in SYSTEMS[1:]:
        if name not in peers:
            print(f"{name}: {systems[name].get('skipped') or systems[name].get('error')}")
    ser = results["serialization"]
    print(f"serialization of {config['big'] // MiB} MiB float64 (GB/s equivalent): d3arrow "
          f"(Arrow IPC metadata + the array's memory) {ser['serialize_d3arrow']:,.0f} out / "
          f"{ser['deserialize_d3arrow']:,.0f} in; pa.ipc.write_tensor {ser['serialize_ipc_write']:.2f}; "
          f"pickle-5 in-band {ser['serialize_pickle5_inband']:.2f} out / "
          f"{ser['deserialize_pickle5_inband']:.2f} in; pickle-5 out-of-band "
          f"{ser['serialize_pickle5_oob']:,.0f} out")
    print("\ntargets:")
    for t in results["targets"]:
        print(f"  [{_verdict(t['met'])}] {t['target']}: {t['measured']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write every figure here")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--system", help=argparse.SUPPRESS)  # run one system, print JSON
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.system:
        print(json.dumps(measure_in_this_process(args.system, json.loads(args.config))))
        return 0

    from . import limits, measure
    config = QUICK if args.quick else FULL
    started = time.perf_counter()
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "config": config,
        "limits": {"socket": limits.socket_throughput(config["big"], config["repeat"]),
                   "memcpy": limits.memcpy_bandwidth(config["big"], config["repeat"])},
        "serialization": measure.serialization_figures(config["big"], config["repeat"]),
        "systems": {},
    }
    if config.get("graphs"):
        from . import graphs
        print("measuring dask threaded ...", file=sys.stderr, flush=True)
        with graphs.threaded_scheduler() as (scheduler, _):
            for work, build in graphs.WORK.items():
                results["limits"][f"threaded_{work}"] = statistics.median(
                    graphs.timed(build, scheduler)[0] for _ in range(config["graphs"]))
    chosen = args.systems.split(",")
    for name in SYSTEMS:
        if name in chosen:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            results["systems"][name] = run_system(name, config)
        else:
            results["systems"][name] = {"skipped": "not asked for"}
    if config.get("same_host"):  # a user's script on one host: benchmarks.same_host
        from . import same_host
        shape = same_host.FULL if config["same_host"] == "full" else same_host.QUICK
        results["same_host"] = {}
        for name in same_host.SYSTEMS:
            if name in chosen:
                print(f"measuring {name} on one host, as a script ...", file=sys.stderr,
                      flush=True)
                results["same_host"][name] = same_host.measure(name, shape)
    if "error" in results["systems"]["d3arrow"]:
        print(f"d3arrow failed: {results['systems']['d3arrow']['error']}", file=sys.stderr)
        return 1
    for way in ("write", "read"):  # measured beside the spills, in the d3arrow run
        if f"dd_{way}_gbps" in results["systems"]["d3arrow"]:
            results["limits"][f"dd_{way}"] = results["systems"]["d3arrow"].pop(f"dd_{way}_gbps")
    results["targets"] = targets(results, config)
    results["seconds"] = time.perf_counter() - started
    print_table(results, config)
    if results.get("same_host"):
        from . import same_host
        print("\none host, as a user's script writes it (benchmarks.same_host):")
        same_host.print_table(results["same_host"])
        results["targets"] += same_host.targets(results["same_host"])
        for t in same_host.targets(results["same_host"]):
            print(f"  [{_verdict(t['met'])}] {t['target']}: {t['measured']}")
    print(f"\n(whole run {results['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
