"""The exceptions d3arrow raises, in one hierarchy.

Expected absences travel as reply statuses ("missing-data"); they become these exceptions
only at the caller that cannot go on without the value.
"""


class D3ArrowError(Exception):
    """Base class of every error d3arrow raises on its own account."""


class CommClosedError(D3ArrowError, ConnectionError):
    """The connection closed (the peer died, or was closed) before a reply arrived."""


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

    def __init__(self, keys):
        self.keys = list(keys)
        super().__init__(f"no worker holds key(s) {', '.join(map(repr, self.keys))}")

    def __str__(self):
        return self.args[0]


class LostDataError(MissingDataError):
    """A value was held only by workers that died, and it cannot be recomputed."""


class AuthenticationError(D3ArrowError, PermissionError):
    """A connection failed the token handshake: no token, a wrong one, or an impostor."""
