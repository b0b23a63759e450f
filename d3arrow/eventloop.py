"""Which event loop d3arrow runs (uvloop) and a loop in a thread for blocking callers.

Blocking facades such as ``Pool.map`` run their coroutine on a :class:`LoopThread`, so
user code never needs to know about asyncio.
"""

import asyncio
import ctypes
import os
import threading
import time

import uvloop

# On a virtual machine a core with nothing to do halts, and waking it for the next message
# takes tens of microseconds: a round trip between two processes cost 69 us asleep, 25 us
# with the caller polling (docs/benchmarks.md). So a worker that answered a request, and a
# caller waiting for a quick reply, poll for this long before they sleep
# ($D3ARROW_SPIN_SECONDS; 0: never).
SPIN_SECONDS = float(os.environ.get("D3ARROW_SPIN_SECONDS", "0.0005"))


try:
    _sched_getcpu = ctypes.CDLL(None).sched_getcpu
except (AttributeError, OSError):  # not glibc
    _sched_getcpu = None


def current_cpu() -> int:
    """The core this thread runs on now (-1 where the system does not say): a caller and
    the worker it waits on that share one should not keep it polling (see StayAwake)."""
    return _sched_getcpu() if _sched_getcpu is not None else -1


def new_event_loop():
    return uvloop.new_event_loop()


def run(coro):
    """Run a coroutine to completion on a fresh uvloop loop (CLIs, tests)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


_on_loop = threading.local()


class MustLeaveLoop(BaseException):
    """Raised inside a call running on a worker's event loop that made a blocking d3arrow
    call (a client inside a task): it would wait on the very loop it blocks. The worker
    runs the call again in a compute thread."""


def running_on_loop():
    """Whether this thread is running a user's call on a worker's event loop."""
    return getattr(_on_loop, "active", False)


class on_loop:
    """While a user's call runs on the event loop: blocking d3arrow calls are refused
    (:class:`MustLeaveLoop`), and the loop is not 'running' for it, so ``asyncio.run``
    inside the call works as in a compute thread."""

    def __enter__(self):
        self._loop = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(None)
        _on_loop.active = True
        return self

    def __exit__(self, *exc):
        _on_loop.active = False
        asyncio.events._set_running_loop(self._loop)
        policy = asyncio.get_event_loop_policy()
        if getattr(getattr(policy, "_local", None), "_loop", None) is not self._loop:
            asyncio.set_event_loop(self._loop)  # asyncio.run in the call unset it


class StayAwake:
    """Keeps the running loop polling for ``seconds`` after each :meth:`poke`, instead of
    sleeping: a caller that sends its next request right after our answer (``apply`` in a
    loop) finds this core awake. It costs at most ``seconds`` of one core per poke, and
    only while the loop has nothing else to do (the loop runs its other work meanwhile;
    the GIL is free while it polls)."""

    def __init__(self, seconds: float = SPIN_SECONDS) -> None:
        self.seconds = seconds
        self._until = 0.0
        self._ticking = False

    def poke(self, caller_cpu: int = -1) -> None:
        """Poll for a while: a caller waits for our answer, and likely asks again at once.
        Not where the caller runs on our core (``caller_cpu``, -1 if unknown): there our
        polling would keep it off the core until our time slice ends (a round trip 0.71 ms
        instead of 0.08); asleep, we let it run at once, and its next request wakes us."""
        if self.seconds <= 0 or (caller_cpu >= 0 and caller_cpu == current_cpu()):
            return
        self._until = time.perf_counter() + self.seconds
        if not self._ticking:
            self._ticking = True
            asyncio.get_running_loop().call_soon(self._tick)

    @property
    def polling(self) -> bool:
        """Whether the loop polls now (rather than sleeping when idle)."""
        return self._ticking

    def _tick(self) -> None:
        """While a callback is ready the loop polls without waiting: one more turn."""
        if time.perf_counter() < self._until:
            asyncio.get_running_loop().call_soon(self._tick)
        else:
            self._ticking = False


class LoopThread:
    """A uvloop loop running forever in a daemon thread."""

    def __init__(self, name="d3arrow-loop"):
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro):
        """Schedule ``coro`` on the loop; return a ``concurrent.futures.Future``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout=None):
        """Run ``coro`` on the loop and block for its result (its exception is raised here)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking d3arrow call was made from its own event loop thread")
        if running_on_loop():
            coro.close()
            raise MustLeaveLoop()
        return self._wait(coro, timeout)

    def _wait(self, coro, timeout):
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            if not future.done():  # our wait ran out (the coroutine's own TimeoutError passes)
                future.cancel()
                if timeout is not None:
                    raise TimeoutError(f"not done within {timeout} s (given up)") from None
            raise

    def call_soon(self, callback, *args):
        self.loop.call_soon_threadsafe(callback, *args)

    def stop(self):
        """Cancel what still runs on the loop, then stop the thread and close the loop."""
        if self.loop.is_closed():
            return
        try:
            self._wait(_cancel_other_tasks(), timeout=10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_other_tasks():
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
