"""The exceptions d3arrow raises, in one hierarchy.

Expected absences travel as reply statuses ("missing-data"); they become these exceptions
only at the caller that cannot go on without the value.
"""


class D3ArrowError(Exception):
    """Base class of every error d3arrow raises on its own account."""


class CommClosedError(D3ArrowError, ConnectionError):
    """The connection to *this* peer failed: it closed, refused us, or went silent.

    Raised only by the local transport, never rebuilt from a remote reply: an error a peer
    *reports* (say, it could not reach the center) arrives as its own type or a
    :class:`RemoteError`, so only this type means "the peer we talked to is gone".
    """


class PeerUnresponsiveError(CommClosedError, TimeoutError):
    """The peer accepted the request but sent nothing for too long (frozen, or hung)."""


class ProtocolError(D3ArrowError):
    """Bytes on the wire that do not form a valid d3arrow message."""


class RemoteError(D3ArrowError):
    """An exception raised in another process whose type could not be rebuilt here.

    Attributes
    ----------
    type_name : str
        Qualified name of the remote exception type.
    remote_traceback : str
        The traceback text as formatted in the remote process.
    """

    def __init__(self, type_name, message, remote_traceback=""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class RemoteTraceback(Exception):
    """Carries a remote traceback text; attached as ``__cause__`` of a re-raised error."""

    def __init__(self, text):
        super().__init__(text)
        self.text = text

    def __str__(self):
        return "\n\n" + self.text


class MissingDataError(D3ArrowError, KeyError):
    """No live worker holds the named keys."""

    def __init__(self, keys, *, reason=None):
        self.keys = list(keys)
        names = ", ".join(map(repr, self.keys))
        super().__init__(f"key(s) {names} {reason}" if reason
                         else f"no worker holds key(s) {names}")

    def __str__(self):
        return self.args[0]


class LostDataError(MissingDataError):
    """A value was held only by workers that died, and it cannot be recomputed."""


class KilledWorkerError(D3ArrowError):
    """A call (or a value) was in hand each time a worker died: it is taken to kill them.

    Like dask's ``allowed-failures``: it was tried on ``allowed_failures + 1`` workers, and
    is handed to no other.
    """

    @classmethod
    def after(cls, what, workers, allowed_failures):
        """The error for ``what`` (a call, a value) that killed each of ``workers``."""
        return cls(f"{what} was in hand each time a worker died: it killed {len(workers)} "
                   f"workers ({', '.join(workers)}); with allowed_failures={allowed_failures} "
                   f"no other worker is handed it")


class NotACenterError(D3ArrowError, ConnectionError):
    """The address given as a center answered as something else (or not at all)."""


class RemoteExit(D3ArrowError):
    """Carries a SystemExit or KeyboardInterrupt that user code raised on a worker.

    Raised inside the client's event loop in their place (asyncio lets those two stop the
    loop); the blocking call that waits for the result raises the original.
    """

    def __init__(self, exc):
        super().__init__(f"{type(exc).__name__} raised remotely")
        self.exc = exc


class AuthenticationError(D3ArrowError, PermissionError):
    """A connection failed the token handshake: no token, a wrong one, or an impostor."""


class SpillError(D3ArrowError, OSError):
    """A worker could not write a value to its local directory (the disk is full, say), or
    a spilled value a reader wanted is gone. Nothing the worker held was lost."""


class WorkerPausedError(D3ArrowError):
    """A worker over the pause mark of its memory limit did not take a computation: the
    client places it elsewhere, or tries again once the worker has spilled.

    ``cannot_spill`` is why the worker cannot spill (its disk is full), or None: where no
    other worker can take the computation, that is the error it fails with.
    """

    def __init__(self, message, cannot_spill=None):
        super().__init__(message)
        self.cannot_spill = cannot_spill
