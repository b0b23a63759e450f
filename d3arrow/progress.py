"""Progress bars: tqdm's (``tqdm.auto``: a widget in a notebook, text in a terminal).

tqdm is optional (``pip install 'd3arrow[progress]'``). Progress is shown when asked for
(``progress=True``) and, by default, only where someone watches: when standard error is a
terminal and tqdm is installed.
"""

import importlib.util
import sys
from collections.abc import Iterable
from typing import Any

from .futures import as_completed
from .references import RemoteData


def progress_bar(total: int, desc: str, progress: bool | None = None) -> Any:
    """A bar counting to ``total``, or None when progress is off (``progress=None``: on
    when standard error is a terminal and tqdm is installed).

    Raises
    ------
    ImportError
        ``progress=True`` without tqdm.
    """
    if progress is None:
        progress = sys.stderr.isatty() and importlib.util.find_spec("tqdm") is not None
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress bars need tqdm: pip install 'd3arrow[progress]' (or "
                          "pip install tqdm)") from None
    return tqdm(total=total, desc=desc, unit="task")


def progress(futures: Iterable[RemoteData], *, desc: str = "tasks",
             timeout: float | None = None) -> None:
    """Show a bar that fills as ``futures`` (submitted tasks, dask-style) finish; return
    when all have, failed or not (see each one's ``exception()``).

    Raises
    ------
    ImportError
        tqdm is not installed.
    TimeoutError
        Not all finished within ``timeout`` seconds.
    """
    futures = list(futures)
    bar = progress_bar(len(futures), desc, True)
    try:
        for _ in as_completed(futures, timeout=timeout):
            bar.update(1)
    finally:
        bar.close()
