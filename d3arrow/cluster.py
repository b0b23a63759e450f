"""LocalCluster: a center and worker processes on this machine, owned by one Python object.

The processes are the real CLIs (``python -m d3arrow.cli.center`` / ``...worker``) on
127.0.0.1 with ports chosen by the kernel. Each child watches a pipe on its stdin, so the
whole cluster goes away with its owner even when the owner is killed.
"""

import dataclasses
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import time
import weakref

from .memory import parse_memory_limit
from .redis_center import configure, is_redis
from .security import TOKEN_ENV, Security

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 10.0


class LocalCluster:
    """A center and ``n_workers`` worker processes on this host.

    Parameters
    ----------
    n_workers : int, default 2
        Worker processes to start.
    ncores : int, optional
        Threads per worker for user functions; default: this machine's cores divided among
        the workers (at least 1).
    host : str, default '127.0.0.1'
        Address every process binds to.
    heartbeat_interval, heartbeat_timeout : float, optional
        Passed to the center (see ``d3arrow-center --help``).
    shm : bool, default True
        Give each worker a shared-memory store, so co-located workers exchange values
        without copies; False forces every transfer over TCP (``d3arrow-worker --no-shm``).
    shm_size : int, optional
        Bytes of shared memory per worker (default: a quarter of the machine's memory).
    log_level : str, default 'WARNING'
        Logging level of the child processes (they log to this process's stderr).
    auth_token : str or False, optional
        Every connection must prove it knows this token; handed to the children in their
        environment, not on their command line. Default: ``$D3ARROW_AUTH_TOKEN``, else a
        random one, so the cluster is private: a :class:`~d3arrow.Client` or
        :class:`~d3arrow.Pool` of this process finds it by the center's address, any
        other process must be given it (:attr:`auth_token`). ``False``: no token, anyone
        on this machine may connect (and run code as this user).
    tls_cert, tls_key, tls_ca : str, optional
        PEM files: every process serves and connects over TLS (mutual with a CA).
    memory_limit : int or str, optional
        Bytes each worker may hold in memory before it spills to disk and pauses (see
        docs/memory.md): ``'2GiB'``, ``'25%'``, ``'auto'`` (the machine's memory split
        among these workers), ``None`` / ``0`` for none (default).
    local_directory : str, optional
        Where workers spill (default: the system's temporary directory).
    dashboard : bool
        Serve the center's status page, ``/status.json``, ``/metrics`` and ``/health`` on a
        free port of ``host`` (default True; see :attr:`dashboard_address`).
    metadata : str, optional
        ``'redis://host:port/db'``: keep the metadata in that Redis server instead of
        starting a center (no status page then); ``heartbeat_interval`` and
        ``heartbeat_timeout`` are stored there for every worker and client using it.

    Attributes
    ----------
    center_address : str
        ``'host:port'`` of the center (the Redis URL with ``metadata``).
    dashboard_address : str or None
        ``'http://host:port/'`` of the center's status page (add ``?token=`` and the
        cluster's token when it has one).
    worker_addresses : list of str
        ``'host:port'`` of each worker, in start order.
    auth_token : str or None
        The cluster's token.

    Examples
    --------
    >>> with LocalCluster(n_workers=2) as cluster:           # doctest: +SKIP
    ...     pool = Pool(cluster.center_address)
    """

    def __init__(self, n_workers=2, ncores=None, *, host="127.0.0.1", heartbeat_interval=None,
                 heartbeat_timeout=None, shm=True, shm_size=None, log_level="WARNING",
                 startup_timeout=STARTUP_TIMEOUT, auth_token=None, tls_cert=None,
                 tls_key=None, tls_ca=None, memory_limit=None, local_directory=None,
                 dashboard=True, metadata=None):
        if auth_token is None:
            auth_token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
        self.auth_token = auth_token or None
        self.security = Security.from_options(self.auth_token or None, tls_cert, tls_key, tls_ca)
        if self.auth_token is None:
            self.security = dataclasses.replace(self.security, token=None)  # not $TOKEN_ENV
        if ncores is None:
            ncores = max(1, (os.cpu_count() or 1) // max(1, n_workers))
        self.n_workers = n_workers
        self.ncores = ncores
        self.host = host
        self.worker_options = ([] if shm else ["--no-shm"]) + (
            ["--shm-size", str(shm_size)] if shm_size else [])
        self.memory_limit = parse_memory_limit(memory_limit, workers_on_host=n_workers)
        if self.memory_limit:  # 'auto' and percentages are shared among our workers
            self.worker_options += ["--memory-limit", str(self.memory_limit)]
        if local_directory is not None:
            self.worker_options += ["--local-directory", os.fspath(local_directory)]
        self.processes = []
        self.worker_processes = []
        self.center_address = None
        self.dashboard_address = None
        self.worker_addresses = []
        self._log_level = log_level
        self._finalizer = weakref.finalize(self, _stop_processes, self.processes)
        deadline = time.monotonic() + startup_timeout
        try:
            if metadata is not None:
                self.center_process = None
                self.center_address = self._use_redis(metadata, heartbeat_interval,
                                                      heartbeat_timeout)
            else:
                self.center_process = self._start_center(dashboard, heartbeat_interval,
                                                         heartbeat_timeout, deadline)
            if self.auth_token is not None:
                _tokens[self.center_address] = self.auth_token
            started = [self._spawn_worker(ncores) for _ in range(n_workers)]
            for process in started:
                self._await_worker(process, deadline)
        except BaseException:
            self.close()
            raise

    def _start_center(self, dashboard, heartbeat_interval, heartbeat_timeout, deadline):
        args = ["--port", "0"] + (["--http-port", "-1"] if dashboard else [])
        if heartbeat_interval is not None:
            args += ["--heartbeat-interval", str(heartbeat_interval)]
        if heartbeat_timeout is not None:
            args += ["--heartbeat-timeout", str(heartbeat_timeout)]
        process = self._spawn("center", args)
        if dashboard:
            self.dashboard_address = _read_address(process, "Status page at ", deadline)
        self.center_address = _read_address(process, "Started center at ", deadline)
        return process

    def _use_redis(self, url, heartbeat_interval, heartbeat_timeout):
        if not is_redis(url):
            raise ValueError(f"metadata={url!r}: give a Redis URL, 'redis://host:port/db'")
        settings = {"heartbeat_interval": heartbeat_interval,
                    "heartbeat_timeout": heartbeat_timeout}
        configure(url, **{k: v for k, v in settings.items() if v is not None})
        return url

    def start_worker(self, *, ncores=None, deadline=None):
        """Start one more worker process; return its address once it has registered."""
        process = self._spawn_worker(ncores or self.ncores)
        return self._await_worker(process, deadline or time.monotonic() + STARTUP_TIMEOUT)

    def _spawn_worker(self, ncores):
        process = self._spawn("worker", [self.center_address, "--port", "0",
                                         "--ncores", str(ncores), *self.worker_options])
        self.worker_processes.append(process)
        return process

    def _await_worker(self, process, deadline):
        address = _read_address(process, "Start worker at ", deadline)
        _read_address(process, "Register with center at ", deadline)
        self.worker_addresses.append(address)
        if self.auth_token is not None:
            _tokens[address] = self.auth_token
        return address

    def _spawn(self, role, args):
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        env.update(self.security.environment())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", f"d3arrow.cli.{role}", "--host", self.host,
                   "--log-level", self._log_level, "--exit-on-stdin-eof",
                   *_tls_arguments(self.security), *args]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   env=env)
        process.stdout_buffer = b""
        self.processes.append(process)
        return process

    def close(self):
        """Stop every process (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        _stop_processes(self.processes)
        for address in [self.center_address, *self.worker_addresses]:
            _tokens.pop(address, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<LocalCluster center={self.center_address} "
                f"workers={len(self.worker_addresses)}>")


_tokens = {}  # address of a center or worker -> token, of the clusters this process started


def token_for(address):
    """The token of a LocalCluster this process started with a server at ``address``."""
    return _tokens.get(address)


def _tls_arguments(security):
    names = {"--tls-cert": security.tls_cert, "--tls-key": security.tls_key,
             "--tls-ca": security.tls_ca}
    return [part for flag, path in names.items() if path for part in (flag, path)]


def _read_address(process, prefix, deadline):
    """Wait for the line ``prefix + address`` on the child's stdout and return the address."""
    fd = process.stdout.fileno()
    while True:
        line, sep, rest = process.stdout_buffer.partition(b"\n")
        if sep:
            process.stdout_buffer = rest
            text = line.decode(errors="replace").strip()
            if text.startswith(prefix):
                return text[len(prefix):]
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{' '.join(process.args[2:4])} did not print {prefix!r} in time")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                code = process.wait(timeout=SHUTDOWN_TIMEOUT)
                raise RuntimeError(f"{process.args[3]} exited with code {code} before it "
                                   f"started; see its messages on stderr")
            process.stdout_buffer += chunk


def _stop_processes(processes):
    """Stop the workers first (they unregister from the center), then the center."""
    _stop_group(processes[1:])
    _stop_group(processes[:1])


def _stop_group(processes):
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop on SIGTERM: killing it", process.args[3])
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
