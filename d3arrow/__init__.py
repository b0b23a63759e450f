"""d3arrow: distributed array computation on Arrow buffers.

A center keeps metadata, workers hold and compute on values and move them peer to peer,
and a :class:`Pool` maps functions over the cluster where the data already lives.
"""

from .client import Client
from .cluster import LocalCluster
from .errors import (
    AuthenticationError,
    CommClosedError,
    D3ArrowError,
    KilledWorkerError,
    LostDataError,
    MissingDataError,
    NotACenterError,
    PeerUnresponsiveError,
    ProtocolError,
    RemoteError,
    SpillError,
)
from .executor import Executor
from .futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, wait
from .pool import Pool
from .progress import progress
from .references import RemoteData

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "as_completed", "wait", "progress",
    "AuthenticationError", "Client", "CommClosedError", "D3ArrowError", "Executor", "KilledWorkerError",
    "LocalCluster", "LostDataError", "NotACenterError", "PeerUnresponsiveError",
    "MissingDataError", "Pool", "ProtocolError", "RemoteData", "RemoteError", "SpillError",
    "__version__",
]
