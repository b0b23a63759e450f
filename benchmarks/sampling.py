"""Peak memory of processes, sampled in a thread: what the benchmarks and the memory tests
report beside their figures."""

import contextlib
import threading

import psutil


def process_memory(pid):
    """``{"VmRSS": bytes, "RssAnon": bytes}`` of a process (all its resident memory, and
    the private part); empty if it is gone."""
    with contextlib.suppress(OSError, ValueError):
        with open(f"/proc/{pid}/status") as f:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                    if line.startswith(("VmRSS", "RssAnon"))}
    return {}


class PeakMemory:
    """Peaks of ``pids`` (default: this process's children, whichever are alive at each
    sample), every ``interval`` seconds: ``peaks`` (VmRSS) and ``private`` (RssAnon) per
    process, and ``total``, the highest sum of VmRSS over them."""

    def __init__(self, pids=None, interval=0.01):
        self.pids = pids
        self.interval = interval
        self.peaks, self.private, self.total = {}, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            pids = self.pids
            if pids is None:
                with contextlib.suppress(psutil.Error):
                    pids = [p.pid for p in me.children(recursive=True)]
            total = 0
            for pid in pids or ():
                found = process_memory(pid)
                if found:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), found["VmRSS"])
                    self.private[pid] = max(self.private.get(pid, 0), found["RssAnon"])
                    total += found["VmRSS"]
            self.total = max(self.total, total)
            self._stop.wait(self.interval)

    @property
    def peak(self):
        """The highest VmRSS of any one process."""
        return max(self.peaks.values(), default=0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
