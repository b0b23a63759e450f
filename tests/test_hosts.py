"""Several hosts: workers in their own network namespaces, with their own addresses.

A bridge joins veth pairs from each namespace, so a worker's value really crosses from one
"host" to another over TCP (namespaces do not share abstract sockets, so no shared memory),
and every server binds a non-loopback address, which requires the token. Needs root and
iproute2; elsewhere the tests are skipped with the reason.
"""

import contextlib
import os
import random
import re
import select
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from d3arrow import AuthenticationError, Pool
from d3arrow.security import TOKEN_ENV

TOKEN = "a token for the namespaces"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="network namespaces need root and iproute2 (ip)"),
    pytest.mark.timeout(120),
]


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """A bridge in this namespace (``.gateway``) and ``n`` namespaces on it (``.addresses``)."""

    def __init__(self, n):
        tag = os.getpid()  # names say whose they are: see _remove_stale
        self.subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        self.bridge = f"d3br{tag}"
        self.namespaces = [f"d3arrow-{tag}-{i}" for i in range(n)]
        self.gateway = f"{self.subnet}.1"
        self.addresses = [f"{self.subnet}.{i + 2}" for i in range(n)]
        self._veths = []

    def __enter__(self):
        _remove_stale()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, (ns, address) in enumerate(zip(self.namespaces, self.addresses)):
                host_end, ns_end = f"{self.bridge}h{i}", f"{self.bridge}n{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
                self._veths.append(host_end)
                _ip("link", "set", ns_end, "netns", ns)
                _ip("link", "set", host_end, "master", self.bridge)
                _ip("link", "set", host_end, "up")
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", ns_end)
                _ip("-n", ns, "link", "set", ns_end, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)


def _remove_stale():
    """Namespaces and bridges left by a test process that was killed before its cleanup."""
    def dead(pid):
        return not os.path.exists(f"/proc/{pid}")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in (line.split()[0] for line in listed.splitlines() if line.strip()):
        match = re.fullmatch(r"d3arrow-(\d+)-\d+", name)
        if match and dead(match[1]):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name in re.findall(r"^\d+: (d3br\d+):", links, flags=re.M):
        if dead(name[4:]):
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def hosts():
    try:
        with Hosts(3) as hosts:
            yield hosts
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make network namespaces here: {e.stderr.strip()}")


def _start(command, *, namespace=None, token=TOKEN):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if token is not None:
        env[TOKEN_ENV] = token
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    # like LocalCluster's children: they exit when our end of their stdin closes, so a
    # test run killed midway (a timeout) leaves no server behind
    process = subprocess.Popen([*prefix, sys.executable, "-m", *command, "--exit-on-stdin-eof"],
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.lines = b""
    return process


def _line(process, prefix, timeout=30):
    """The rest of the first stdout line starting with ``prefix`` (unbuffered reads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line, newline, rest = process.lines.partition(b"\n")
        if newline:
            process.lines = rest
            if line.decode().startswith(prefix):
                return line.decode()[len(prefix):].strip()
            continue
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            process.lines += chunk
    process.kill()
    process.wait()
    raise AssertionError(f"no {prefix!r} line; stderr: {process.stderr.read()[-500:]!r}")


@contextlib.contextmanager
def _running(*processes):
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=15)
            for stream in (process.stdin, process.stdout, process.stderr):
                stream.close()


def test_workers_on_two_hosts_trade_values_over_tcp_with_the_token(hosts):
    center = _start(["d3arrow.cli.center", "--host", hosts.gateway, "--port", "0"])
    with _running(center):
        center_address = _line(center, "Started center at ")
        workers = [_start(["d3arrow.cli.worker", center_address, "--host", address],
                          namespace=ns)
                   for ns, address in zip(hosts.namespaces[:2], hosts.addresses[:2])]
        with _running(*workers):
            a, b = (_line(w, "Start worker at ") for w in workers)
            for w in workers:
                _line(w, "Register with center at ")
            with Pool(center_address, auth_token=TOKEN) as pool:
                identities = {w: pool.client.sync(pool.client._rpc(w).identity) for w in (a, b)}
                assert identities[a]["host"] != identities[b]["host"]  # not co-located
                x = pool.apply(lambda: np.arange(2_000_000.0), workers=[a])
                total = pool.apply(lambda v: float(v.sum()), [x], workers=[b])  # a -> b
                assert total.get() == float(np.arange(2_000_000.0).sum())
                assert set(pool.client.who_has([x.key])[x.key]) == {a, b}  # b has a replica
                np.testing.assert_array_equal(x.get(), np.arange(2_000_000.0))
            with pytest.raises(AuthenticationError):
                Pool(center_address, auth_token=None)


def test_on_another_host_a_server_without_the_token_is_refused(hosts):
    center = _start(["d3arrow.cli.center", "--host", hosts.gateway, "--port", "0"])
    with _running(center):
        center_address = _line(center, "Started center at ")
        no_token = _start(["d3arrow.cli.worker", center_address, "--host", hosts.addresses[2]],
                          namespace=hosts.namespaces[2], token=None)
        wrong_token = _start(["d3arrow.cli.worker", center_address,
                              "--host", hosts.addresses[2]],
                             namespace=hosts.namespaces[2], token="not the token")
        with _running(no_token, wrong_token):
            assert no_token.wait(timeout=30) == 1
            assert b"without an auth token" in no_token.stderr.read()
            assert wrong_token.wait(timeout=30) == 1
            assert b"tokens differ" in wrong_token.stderr.read()
