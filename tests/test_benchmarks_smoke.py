"""The comparison script runs end to end (quick sizes, d3arrow only) and writes its figures."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_quick_writes_every_figure(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--quick", "--systems",
                           "d3arrow", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    figures = results["systems"]["d3arrow"]
    assert figures["tiny_tasks_per_s"] > 0 and figures["round_trip_ms"] > 0
    assert all(value > 0 for key, value in figures.items()
               if key.startswith("task_input") and not key.endswith("_pairs"))
    pairs = figures[f"task_input_tcp_{results['config']['big']}_per_socket_pairs"]
    assert len(pairs) == results["config"]["pairs"] and all(r > 0 for r in pairs)
    assert results["limits"]["socket"] > 0 and results["limits"]["memcpy"] > 0
    assert figures["spill_write_gbps"] > 0 and figures["spill_read_gbps"] > 0
    assert results["limits"]["dd_write"] > 0 and results["limits"]["dd_read"] > 0
    assert "targets:" in done.stdout and "d3arrow/limit" in done.stdout
    same_host = results["same_host"]["d3arrow"]  # as a script: functions of __main__
    for key in ("get_shm_ms", "apply_main_ms", "apply_importable_ms", "task_input_ms",
                "tiny_main_per_s", "tiny_remote_per_s", "pipeline_s",
                "pipeline_storeless_s"):
        assert same_host[key] > 0, key
    assert "one host, as a user's script writes it" in done.stdout


def test_paired_rounds_give_the_median_ratio_and_its_95_percent_interval():
    from benchmarks.same_host import paired_ratio

    plain = [float(i) for i in range(1, 42)]  # round i: ratio i (41 rounds)
    median, interval = paired_ratio(plain, [1.0] * 41)
    # the 14th and 28th smallest of 41 hold the median with >= 95% (2 P(Bin(41, 1/2) <= 13))
    assert median == 21.0 and interval == [14.0, 28.0]
    assert paired_ratio([2.0] * 5, [1.0] * 5) == (2.0, None)  # too few rounds to tell
