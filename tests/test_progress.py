"""Progress bars: tqdm's, when asked for or where someone watches a terminal."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time

import cloudpickle
import dask
import dask.array as da
import pytest

import d3arrow

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def slow_double(x):
    time.sleep(0.01)
    return 2 * x


def test_map_shows_a_bar_that_reaches_every_call(pool, capsys):
    results = pool.map(slow_double, range(40), progress=True)
    assert pool.gather(results) == [2 * x for x in range(40)]
    bar = capsys.readouterr().err
    assert "40/40" in bar and "slow_double" in bar
    pool.map(slow_double, range(5))  # not a terminal here: off by default
    assert capsys.readouterr().err == ""


def test_progress_of_futures_waits_for_all_failed_or_not(pool, capsys):
    futures = [pool.submit(slow_double, x) for x in range(10)]
    futures.append(pool.submit(lambda: 1 / 0))
    d3arrow.progress(futures)
    assert all(f.done() for f in futures)
    assert isinstance(futures[-1].exception(), ZeroDivisionError)
    assert "11/11" in capsys.readouterr().err


def test_a_dask_graph_shows_its_tasks(pool, capsys):
    x = da.ones((40, 40), chunks=10) + 1
    (total,) = dask.compute(x.sum(), scheduler=pool.get, progress=True)
    assert total == 3200
    bar = capsys.readouterr().err
    assert "graph" in bar and "100%" in bar


SCRIPT = """
import d3arrow, sys
with d3arrow.Pool(n_workers=1, ncores=1) as pool:
    pool.map(abs, range(30))
    if sys.argv[1] == "ask":
        pool.map(abs, range(3), progress=True)
print("done", flush=True)
"""


def _run_in_terminal(*args, block_tqdm=False):
    """Run SCRIPT with its standard error on a pseudo-terminal: (exit code, what it wrote)."""
    code = ("import sys; sys.modules['tqdm'] = None\n" if block_tqdm else "") + SCRIPT
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run([sys.executable, "-c", code, *args], stderr=follower,
                              stdout=subprocess.PIPE, timeout=90)
        os.close(follower)
        written = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal is closed and read
                break
            if not chunk:
                break
            written += chunk
        return done.returncode, written.decode(errors="replace"), done.stdout.decode()
    finally:
        os.close(leader)


def test_on_by_default_in_a_terminal_and_a_clear_error_without_tqdm():
    code, terminal, out = _run_in_terminal("default")
    assert code == 0 and "30/30" in terminal and "done" in out
    code, terminal, out = _run_in_terminal("default", block_tqdm=True)  # off without tqdm
    assert code == 0 and "30/30" not in terminal and "done" in out
    code, terminal, out = _run_in_terminal("ask", block_tqdm=True)
    assert code == 1 and "progress bars need tqdm" in terminal
