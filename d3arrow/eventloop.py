"""Which event loop d3arrow runs (uvloop) and a loop in a thread for blocking callers.

Blocking facades such as ``Pool.map`` run their coroutine on a :class:`LoopThread`, so
user code never needs to know about asyncio.
"""

import asyncio
import threading

import uvloop


def new_event_loop():
    return uvloop.new_event_loop()


def run(coro):
    """Run a coroutine to completion on a fresh uvloop loop (CLIs, tests)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


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
            self.run(_cancel_other_tasks(), timeout=10)
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
