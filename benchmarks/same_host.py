"""Same host, as a user's script sees it: d3arrow beside Ray, multiprocessing.Pool and dask.

    python -m benchmarks.same_host [--systems d3arrow,ray,multiprocessing,dask] [--quick]

Each system runs in its own process: this file run as a script, so the functions defined
below are the script's own (``__main__``), as in a user's script; "importable" calls use
``benchmarks.peers._inc``, sent by name. 2 worker processes of 1 core each (Ray: 2 CPUs,
``multiprocessing.Pool(2)``, dask: 2 workers x 1 thread). Medians; ``first`` figures are
the first call on a freshly started pool. ``python -m benchmarks.compare`` prints these rows
too, docs/benchmarks.md quotes them.

- get: the client gets a 256 MiB array a task made on a worker since the last get (Ray:
  ``ray.get`` of a task's result); again: the same value a second time.
- apply: one call with its value back: ``pool.apply(f, [i]).get()``; Ray
  ``ray.get(f.remote(i))``; multiprocessing ``pool.apply(f, (i,))``, also with its workers
  and the caller pinned to the caller's core, where its round trip is fastest (the system
  puts them there for about half the calls).
- task input: a task on worker B whose 256 MiB input a task made on worker A, until its
  RemoteData is back (Ray: a task on the ref of another task's result, with its value);
  the median of 100 calls.
- tiny map: ``map`` of the script's ``inc`` over 10,000 integers; d3arrow also over 10,000
  values held remotely (the results of the first map), and the same with a function sent by
  name. The four maps run in turn, 41 rounds; "over remote values no slower than over plain
  values" is judged round by round: the median of the rounds' ratios and the interval that
  holds the true median with 95% confidence (order statistics of the ratios). Slower means
  the whole interval below 1. Beside it, two maps of the same work (the script's function
  and an importable one, over numbers) paired the same way: how finely the run can tell.
- pipeline: 32 arrays of 32 MiB made on the workers, ``np.sqrt`` of each, ``np.sum`` of each (all
  functions of the script),
  the sums added by one more call, its value back; five runs in a row, each freeing the
  previous run's values first. d3arrow also without its shared-memory store
  (``shm=False``); "warm" is the median of runs 2-5. For reference, the same work in
  place: each of the ``multiprocessing.Pool``'s 2 processes makes, roots and sums its half
  of the arrays, nothing moved between them (what the machine allows with no framework).
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time

if __name__ == "__main__":  # run as a script: the repository's root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

MiB = 2**20
SYSTEMS = ["d3arrow", "ray", "multiprocessing", "dask"]
FULL = {"big": 256 * MiB, "calls": 300, "repeat": 10, "task_repeat": 100, "tiny": 10_000,
        "tiny_repeat": 5, "tiny_rounds": 41,
        "pipeline": {"arrays": 32, "nbytes": 32 * MiB, "runs": 5}}
QUICK = {"big": 32 * MiB, "calls": 50, "repeat": 3, "task_repeat": 3, "tiny": 1_000,
         "tiny_repeat": 1,
         "pipeline": {"arrays": 4, "nbytes": 4 * MiB, "runs": 2}}


# -- the script's own functions (``__main__`` when this file runs as a script) ------------------

def inc(x):
    return x + 1


def make(nbytes, seed):
    return np.random.default_rng(seed).random(nbytes // 8)


def filled(nbytes, seed):
    return np.full(nbytes // 8, float(seed))


def total(*sums):
    return sum(sums)


def root(array):
    return np.sqrt(array)


def summed(array):
    return np.sum(array)


def length(value):
    return len(value)


def core_of(i):
    """The core the call runs on (-1: unknown)."""
    from d3arrow.eventloop import current_cpu

    return current_cpu()


def half_in_place(nbytes, seeds):
    """One process's share of the pipeline, stage by stage, nothing moved: the same work
    with no framework, what two processes reach on this machine."""
    made = [make(nbytes, seed) for seed in seeds]
    roots = [root(array) for array in made]
    return [summed(array) for array in roots]


# -- measuring ------------------------------------------------------------------------------------

def _timed(call, n):
    """(seconds of the first call, median seconds of the ``n`` calls after it)."""
    start = time.perf_counter()
    call(0)
    first = time.perf_counter() - start
    seconds = []
    for i in range(1, n + 1):
        start = time.perf_counter()
        call(i)
        seconds.append(time.perf_counter() - start)
    return first, statistics.median(seconds)


def _timed_once(call):
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    del result
    return seconds


def _timed_each(call, n):
    """Like :func:`_timed`, where ``call(i)`` times itself (returns its seconds)."""
    seconds = [call(i) for i in range(n + 1)]
    return seconds[0], statistics.median(seconds[1:])


def _gets(figures, get_new, n):
    """First, median and second-get figures of ``get_new(i) -> (seconds, seconds again)``."""
    measured = [get_new(i) for i in range(n + 1)]
    figures["get_shm_first_ms"] = measured[0][0] * 1e3
    figures["get_shm_ms"] = statistics.median(m[0] for m in measured[1:]) * 1e3
    figures["get_shm_again_ms"] = statistics.median(m[1] for m in measured[1:]) * 1e3


def _round_trips(figures, calls, n, rounds=3, *, first=True):
    """First calls (unless not ``first``), then medians of ``n`` calls each, taken in
    alternating rounds: the machine's state drifts over a run, and both functions should
    see the same drift."""
    seconds = {name: [] for name in calls}
    for name, call in calls.items():
        start = time.perf_counter()
        call(0)
        if first:
            figures[f"{name}_first_ms"] = (time.perf_counter() - start) * 1e3
    for _ in range(rounds):
        for name, call in calls.items():
            for i in range(n // rounds):
                start = time.perf_counter()
                call(i)
                seconds[name].append(time.perf_counter() - start)
    for name in calls:
        figures[f"{name}_ms"] = statistics.median(seconds[name]) * 1e3


def _same_core(figures, apply_core, n=100):
    """The share of ``n`` calls that ran on the caller's core (``apply_core(i)``: the core a
    call ran on). A worker on the caller's core takes turns with it, no core wakes the
    other: multiprocessing's round trip is then its fastest (~0.05 ms here)."""
    from d3arrow.eventloop import current_cpu

    if current_cpu() < 0:  # the system does not say
        return
    same = sum(apply_core(i) == current_cpu() for i in range(n))
    figures["apply_same_core_share"] = same / n


class _OnOneCore:
    """Every thread of this process and of ``pids`` on the core this thread runs on, as
    they were after: multiprocessing's fastest placement, its worker beside its caller.
    Not entered (``pinned`` False) where the system does not say or allow."""

    def __init__(self, pids):
        from d3arrow.eventloop import current_cpu

        self.core = current_cpu()
        self.threads = [int(t) for pid in [os.getpid(), *pids]
                        for t in _threads_of(pid)] if hasattr(os, "sched_setaffinity") else []
        self.pinned = False

    def __enter__(self):
        self.before = {}
        if self.core < 0 or not self.threads:
            return self
        for t in self.threads:
            try:
                cores = os.sched_getaffinity(t)
                os.sched_setaffinity(t, {self.core})
                self.before[t] = cores  # (only those pinned are put back, and counted)
            except OSError:  # (a thread that ended meanwhile, or pinning refused)
                pass
        self.pinned = bool(self.before)
        return self

    def __exit__(self, *exc):
        for t, cores in self.before.items():
            try:
                os.sched_setaffinity(t, cores)
            except OSError:  # (a thread that ended meanwhile)
                pass


def _threads_of(pid):
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _ms(figures, name, pair):
    figures[f"{name}_first_ms"], figures[f"{name}_ms"] = (s * 1e3 for s in pair)


def paired_ratio(first, second, confidence=0.95):
    """The median of ``first[i] / second[i]`` (seconds of two things timed in turn each
    round: above 1, the second was faster) and the interval that holds the true median
    with ``confidence``, from the ratios' order statistics (no assumption on their
    spread); None for the interval with too few rounds (95%: 6)."""
    ratios = sorted(a / b for a, b in zip(first, second))
    n = len(ratios)
    # the interval [k-th, (n-k+1)-th smallest] misses the median with probability
    # 2 P(Binomial(n, 1/2) < k): the widest k that keeps that within 1 - confidence
    k, tail = 0, 0.0
    while k < n // 2 and 2 * (tail + math.comb(n, k) / 2**n) <= 1 - confidence:
        tail += math.comb(n, k) / 2**n
        k += 1
    interval = [ratios[k - 1], ratios[n - k]] if k else None
    return statistics.median(ratios), interval


def _pipeline_runs(run_once, runs):
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        run_once()
        seconds.append(time.perf_counter() - start)
    return seconds


def _pipeline_figures(figures, name, seconds):
    figures[f"{name}_s"] = statistics.median(seconds)
    figures[f"{name}_runs"] = seconds
    if len(seconds) > 1:
        figures[f"{name}_warm_s"] = statistics.median(seconds[1:])


def run_d3arrow(config):
    from d3arrow import LocalCluster, Pool

    from benchmarks.peers import _inc

    figures = {}
    with LocalCluster(n_workers=2, ncores=1) as local, Pool(local.center_address) as pool:
        a, b = local.worker_addresses
        _round_trips(figures, {"apply_main": lambda i: pool.apply(inc, [i]).get(),
                               "apply_importable": lambda i: pool.apply(_inc, [i]).get()},
                     config["calls"])
        _same_core(figures, lambda i: pool.apply(core_of, [i]).get())

        def get_new(i):  # a value made on A since the last get, then its value here
            made = pool.apply(filled, [config["big"], i], workers=[a])
            seconds = _timed_once(made.get)
            seconds_again = _timed_once(made.get)
            pool.delete([made])
            return seconds, seconds_again

        _gets(figures, get_new, config["repeat"])
        big = pool.apply(make, [config["big"], 0], workers=[a])

        def task_on_b(i):  # B's copy goes after each call: the next one fetches again
            seconds = _timed_once(lambda: pool.apply(len, [big], workers=[b]))
            client = pool.client
            client.sync(client._rpc(b).delete_data, keys=[big.key])
            return seconds

        _ms(figures, "task_input", _timed_each(task_on_b, config["task_repeat"]))
        pool.delete([big])
        n = config["tiny"]
        pool.map(inc, range(1000))

        held = pool.map(_inc, range(n))
        maps = {"tiny_main_per_s": lambda: pool.map(inc, range(n)),
                "tiny_importable_per_s": lambda: pool.map(_inc, range(n)),
                "tiny_remote_per_s": lambda: pool.map(_inc, held),
                "tiny_main_remote_per_s": lambda: pool.map(inc, held)}
        seconds = {name: [] for name in maps}
        rounds = config.get("tiny_rounds", config["tiny_repeat"])
        for _ in range(rounds):  # in turn: each sees the same drift
            for name, call in maps.items():
                seconds[name] += _pipeline_runs(call, 1)
        for name in maps:
            figures[name] = n / statistics.median(seconds[name])
        # round by round (one map after the other: the same drift), with how precisely
        # the run tells: two maps of the same work (a function by value and the same by
        # name, over numbers) beside the comparison of held values with numbers
        for name, (first, second) in {
                "tiny_remote_vs_plain": ("tiny_importable_per_s", "tiny_remote_per_s"),
                "tiny_same_work": ("tiny_main_per_s", "tiny_importable_per_s")}.items():
            figures[name], figures[name + "_interval"] = paired_ratio(
                seconds[first], seconds[second])
    for shm, name in ((True, "pipeline"), (False, "pipeline_storeless")):
        with LocalCluster(n_workers=2, ncores=1, shm=shm) as local, \
                Pool(local.center_address, shm=shm) as pool:
            _pipeline_figures(figures, name, _pipeline_runs(
                lambda: _d3arrow_pipeline(pool, config["pipeline"]),
                config["pipeline"]["runs"]))
    return figures


def _d3arrow_pipeline(pool, config):
    made = pool.map(make, [config["nbytes"]] * config["arrays"], range(config["arrays"]))
    roots = pool.map(root, made)
    sums = pool.map(summed, roots)
    result = pool.apply(total, sums)
    value = result.get()
    pool.delete([*made, *roots, *sums, result])
    return value


def run_ray(config):
    import ray

    from benchmarks.peers import _inc

    figures = {}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        inc_main, inc_importable = ray.remote(inc), ray.remote(_inc)
        make_remote, length_remote = ray.remote(make), ray.remote(length)
        _round_trips(figures, {"apply_main": lambda i: ray.get(inc_main.remote(i)),
                               "apply_importable": lambda i: ray.get(inc_importable.remote(i))},
                     config["calls"])
        filled_remote = ray.remote(filled)

        def get_new(i):
            made = filled_remote.remote(config["big"], i)
            ray.wait([made])
            seconds = _timed_once(lambda: ray.get(made))
            seconds_again = _timed_once(lambda: ray.get(made))
            return seconds, seconds_again

        _gets(figures, get_new, config["repeat"])
        big = make_remote.remote(config["big"], 0)
        ray.wait([big])
        _ms(figures, "task_input", _timed(lambda i: ray.get(length_remote.remote(big)),
                                          config["task_repeat"]))
        n = config["tiny"]
        ray.get([inc_main.remote(i) for i in range(1000)])
        seconds = _pipeline_runs(lambda: ray.get([inc_main.remote(i) for i in range(n)]),
                                 config["tiny_repeat"])
        figures["tiny_main_per_s"] = n / statistics.median(seconds)
        sqrt, add_up, sum_ = ray.remote(root), ray.remote(total), ray.remote(summed)
        p = config["pipeline"]

        def pipeline():
            made = [make_remote.remote(p["nbytes"], i) for i in range(p["arrays"])]
            sums = [sum_.remote(sqrt.remote(m)) for m in made]
            return ray.get(add_up.remote(*sums))

        _pipeline_figures(figures, "pipeline", _pipeline_runs(pipeline, p["runs"]))
    finally:
        ray.shutdown()
    return figures


def run_multiprocessing(config):
    import multiprocessing

    from benchmarks.peers import _inc

    figures = {}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        _round_trips(figures, {"apply_main": lambda i: pool.apply(inc, (i,)),
                               "apply_importable": lambda i: pool.apply(_inc, (i,))},
                     config["calls"])
        _same_core(figures, lambda i: pool.apply(core_of, (i,)))
        workers = [child.pid for child in multiprocessing.active_children()]
        with _OnOneCore(workers) as one_core:  # where it is at its fastest
            if one_core.pinned:
                _round_trips(figures, {"apply_main_pinned": lambda i: pool.apply(inc, (i,)),
                                       "apply_importable_pinned":
                                           lambda i: pool.apply(_inc, (i,))},
                             config["calls"], first=False)
        n = config["tiny"]
        pool.map(inc, range(1000))
        seconds = _pipeline_runs(lambda: pool.map(inc, range(n), chunksize=1),
                                 config["tiny_repeat"])
        figures["tiny_main_per_s"] = n / statistics.median(seconds)
        p = config["pipeline"]

        def pipeline():  # every array travels back to this process between the steps
            made = pool.starmap(make, [(p["nbytes"], i) for i in range(p["arrays"])])
            sums = pool.map(summed, pool.map(root, made))
            return pool.apply(total, sums)

        _pipeline_figures(figures, "pipeline", _pipeline_runs(pipeline, 1))  # ~20 s a run

        def in_place():  # each process its half of the arrays: the reference, not a peer
            halves = pool.starmap(half_in_place, [(p["nbytes"], range(i, p["arrays"], 2))
                                                  for i in range(2)])
            return total(*halves[0], *halves[1])

        _pipeline_figures(figures, "pipeline_in_place", _pipeline_runs(in_place, p["runs"]))
    return figures


def run_dask(config):
    from distributed import Client, LocalCluster

    figures = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        _ms(figures, "apply_main", _timed(
            lambda i: client.submit(inc, i, pure=False).result(), config["calls"] // 10))
        p = config["pipeline"]

        def pipeline():
            made = client.map(make, [p["nbytes"]] * p["arrays"], range(p["arrays"]),
                              pure=False)
            sums = client.map(summed, client.map(root, made, pure=False), pure=False)
            return client.submit(total, *sums, pure=False).result()

        _pipeline_figures(figures, "pipeline", _pipeline_runs(pipeline, p["runs"]))
    return figures


RUNNERS = {"d3arrow": run_d3arrow, "ray": run_ray, "multiprocessing": run_multiprocessing,
           "dask": run_dask}
NEEDS = {"dask": "distributed", "ray": "ray"}


def measure(name, config):
    """Figures of one system, measured in a fresh process running this file as a script."""
    import importlib.util

    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        return {"skipped": f"{NEEDS[name]} is not installed"}
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--system", name,
                           "--config", json.dumps(config)],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


ROWS = [  # (label, unit, key, higher is better)
    ("client gets a 256 MiB value a co-located worker holds", "ms", "get_shm_ms", False),
    ("  the first get of this client", "ms", "get_shm_first_ms", False),
    ("  the same value again", "ms", "get_shm_again_ms", False),
    ("apply(f, [i]).get(), f of the script", "ms", "apply_main_ms", False),
    ("  first call", "ms", "apply_main_first_ms", False),
    ("  workers pinned to the caller's core", "ms", "apply_main_pinned_ms", False),
    ("apply(f, [i]).get(), f importable", "ms", "apply_importable_ms", False),
    ("  first call", "ms", "apply_importable_first_ms", False),
    ("  workers pinned to the caller's core", "ms", "apply_importable_pinned_ms", False),
    ("task on B, 256 MiB input made on A", "ms", "task_input_ms", False),
    ("  first", "ms", "task_input_first_ms", False),
    ("map of 10,000 tiny calls, f of the script", "tasks/s", "tiny_main_per_s", True),
    ("  f importable", "tasks/s", "tiny_importable_per_s", True),
    ("  f importable, over 10,000 remote values", "tasks/s", "tiny_remote_per_s", True),
    ("  f of the script, over 10,000 remote values", "tasks/s", "tiny_main_remote_per_s",
     True),
    ("pipeline 32 x 32 MiB (make, sqrt, sum, add), median of runs", "s", "pipeline_s", False),
    ("  warm runs (2-5)", "s", "pipeline_warm_s", False),
    ("  d3arrow without its store (shm=False)", "s", "pipeline_storeless_s", False),
    ("  d3arrow without its store, warm runs", "s", "pipeline_storeless_warm_s", False),
    ("  the same work in place: 2 processes, each its half, nothing moved", "s",
     "pipeline_in_place_s", False),
    ("  the same work in place, warm runs", "s", "pipeline_in_place_warm_s", False),
]


def targets(systems):
    """Issue 13's targets: [{target, measured, met}]."""
    d3 = systems.get("d3arrow", {})
    ray, mp, dask = (systems.get(s, {}) for s in ("ray", "multiprocessing", "dask"))
    out = []

    def add(text, ours, theirs, limit, *, faster=False, note=""):
        if ours is None or theirs is None:
            return
        ratio = theirs / ours if faster else ours / theirs
        met = ratio >= limit if faster else ratio <= limit
        out.append({"target": text,
                    "measured": f"{ours:.3g} vs {theirs:.3g}: {ratio:.2f}x{note}", "met": met})

    cores = ""  # where each one's worker ran: on the caller's core, multiprocessing's fastest
    if "apply_same_core_share" in d3 and "apply_same_core_share" in mp:
        cores = (f" (calls on the caller's core: d3arrow {d3['apply_same_core_share']:.0%}, "
                 f"multiprocessing {mp['apply_same_core_share']:.0%})")

    add("get of a co-located 256 MiB value <= Ray's ray.get", d3.get("get_shm_ms"),
        ray.get("get_shm_ms"), 1.0)
    add("apply(f of the script).get() <= 1.2x multiprocessing", d3.get("apply_main_ms"),
        mp.get("apply_main_ms"), 1.2, note=cores)
    add("apply(f importable).get() <= multiprocessing", d3.get("apply_importable_ms"),
        mp.get("apply_importable_ms"), 1.0, note=cores)
    for kind, limit in (("main", 1.2), ("importable", 1.0)):  # whatever the system did
        ours, fastest = d3.get(f"apply_{kind}_ms"), mp.get(f"apply_{kind}_pinned_ms")
        if ours is not None and fastest is not None:
            out.append({"target": f"  apply, f {'of the script' if kind == 'main' else kind}"
                                  f", against multiprocessing at its fastest (its workers "
                                  f"on the caller's core; no target, {limit}x above)",
                        "measured": f"{ours:.3g} vs {fastest:.3g}: {ours / fastest:.2f}x",
                        "met": None})
    add("task on B with a 256 MiB input on co-located A <= 1 ms", d3.get("task_input_ms"),
        1.0, 1.0)
    add("pipeline >= 1.5x faster than dask.distributed", d3.get("pipeline_s"),
        dask.get("pipeline_s"), 1.5, faster=True)
    add("pipeline warm runs within 1.2x of d3arrow without its store",
        d3.get("pipeline_warm_s"), d3.get("pipeline_storeless_warm_s"), 1.2)
    in_place = mp.get("pipeline_in_place_s")
    if d3.get("pipeline_s") is not None and in_place is not None:  # the reference
        out.append({"target": "  pipeline beside the same work in place (no target)",
                    "measured": f"d3arrow {d3['pipeline_s']:.3g} s, in place {in_place:.3g} s: "
                                f"{d3['pipeline_s'] / in_place:.2f}x", "met": None})
    add("map of a script's function >= 20,000 tasks/s", 20_000, d3.get("tiny_main_per_s"),
        1.0, faster=True)
    paired = d3.get("tiny_remote_vs_plain")
    if paired is not None:  # each round's two maps, paired: drift between rounds cancels
        interval = d3.get("tiny_remote_vs_plain_interval")
        # slower only where the run shows it: the whole 95% interval below 1
        out.append({"target": "map over remote values no slower than over plain values "
                              "(paired rounds, 95% interval of the median ratio)",
                    "measured": f"{paired:.3f}x" + _interval(interval),
                    "met": (interval[1] if interval else paired) >= 1.0})
    if d3.get("tiny_remote_per_s") and d3.get("tiny_importable_per_s"):
        out.append({"target": "  same, ratio of the medians (no target: drift stays in)",
                    "measured": f"{d3['tiny_remote_per_s'] / d3['tiny_importable_per_s']:.2f}x",
                    "met": None})
    same = d3.get("tiny_same_work")
    if same is not None:  # what the run can tell apart: two maps of the same work
        out.append({"target": "  two maps of the same work, paired the same way (no target)",
                    "measured": f"{same:.3f}x" + _interval(d3.get("tiny_same_work_interval")),
                    "met": None})
    return out


def _interval(interval):
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def print_table(systems, print=print):
    present = [s for s in SYSTEMS if s in systems and "error" not in systems[s]
               and "skipped" not in systems[s]]
    header = ["measure", "unit"] + present + [f"d3arrow vs {s}" for s in present[1:]]
    table = [header]
    for label, unit, key, higher in ROWS:
        values = [systems[s].get(key) for s in present]
        if all(v is None for v in values):
            continue
        d3 = systems.get("d3arrow", {}).get(key)
        ratios = []
        for other in values[1:]:
            ratios.append(f"{(d3 / other if higher else other / d3):.2f}x"
                          if d3 and other else "")
        table.append([label, unit] + [fmt(v) for v in values] + ratios)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                         for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    for name in SYSTEMS:
        if name in systems and name not in present:
            print(f"{name}: {systems[name].get('skipped') or systems[name].get('error')}")
    runs = {s: " ".join(f"{x:.2f}" for x in systems[s]["pipeline_runs"]) for s in present
            if "pipeline_runs" in systems[s]}
    print("pipeline runs (s): " + "; ".join(f"{s} {r}" for s, r in runs.items()) +
          ("; d3arrow without its store " + " ".join(
              f"{x:.2f}" for x in systems["d3arrow"]["pipeline_storeless_runs"])
           if "pipeline_storeless_runs" in systems.get("d3arrow", {}) else ""))
    print("'vs': how many times better d3arrow did (the peer's time over d3arrow's, or the "
          "throughput ratio)")


def verdict(met):
    """How a target line reads: met, NOT MET, or info (a figure beside, no target)."""
    return "info" if met is None else "met" if met else "NOT MET"


def fmt(value):
    """A figure for a table: thousands with separators, smaller ones with two decimals."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write every figure here")
    parser.add_argument("--system", help=argparse.SUPPRESS)  # measure one, print JSON
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.system:
        print(json.dumps(RUNNERS[args.system](json.loads(args.config))))
        return 0
    config = QUICK if args.quick else FULL
    systems = {}
    for name in args.systems.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        systems[name] = measure(name, config)
    print_table(systems)
    print("\ntargets:")
    for t in targets(systems):
        print(f"  [{verdict(t['met'])}] {t['target']}: {t['measured']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "systems": systems, "targets": targets(systems)}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
