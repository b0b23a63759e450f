"""Tokens and TLS: invited processes work as before, strangers run nothing and learn why."""

import asyncio
import datetime
import ipaddress
import socket
import ssl
import subprocess
import sys

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import gen_cluster
from d3arrow import LocalCluster, Pool
from d3arrow import security as security_module
from d3arrow.core import ConnectionPool
from d3arrow.errors import AuthenticationError
from d3arrow.eventloop import run
from d3arrow.security import Security

TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, ncores=1, shm=False, auth_token=TOKEN) as cluster:
        yield cluster


def _cluster_keys(cluster):
    with Pool(cluster.center_address, auth_token=TOKEN) as pool:
        return pool.client.who_has()


def test_a_client_with_the_token_computes_and_workers_trade_peer_to_peer(cluster):
    a, b = cluster.worker_addresses
    with Pool(cluster.center_address, auth_token=TOKEN, shm=False) as pool:
        x = pool.apply(lambda: np.arange(1_000_000.0), workers=[a])
        total = pool.apply(lambda v: float(v.sum()), [x], workers=[b])  # fetched from a
        assert total.get() == float(np.arange(1_000_000.0).sum())
        assert [r.get() for r in pool.map(lambda i: i * 2, range(5))] == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("token", [None, "wrong token"])
def test_a_client_without_the_right_token_is_refused_and_runs_nothing(cluster, token,
                                                                     monkeypatch):
    monkeypatch.delenv(security_module.TOKEN_ENV, raising=False)
    before = _cluster_keys(cluster)
    with pytest.raises(AuthenticationError, match="token"):
        Pool(cluster.center_address, auth_token=token or False)  # False: none at all

    async def compute_on_a_worker():
        pool = ConnectionPool(security=Security.from_options(token))
        try:
            await pool.rpc(cluster.worker_addresses[0]).compute(
                function=None, keys=["intruder"], args=[])
        finally:
            pool.close()

    with pytest.raises(AuthenticationError, match="token"):
        run(compute_on_a_worker())
    assert _cluster_keys(cluster) == before  # the cluster is up and nothing was added


def test_the_token_can_come_from_the_environment(cluster, monkeypatch):
    monkeypatch.setenv(security_module.TOKEN_ENV, TOKEN)
    with Pool(cluster.center_address) as pool:
        assert pool.apply(abs, [-3]).get() == 3


def test_the_token_is_not_on_any_command_line(cluster):
    for process in cluster.processes:
        with open(f"/proc/{process.pid}/cmdline", "rb") as f:
            assert TOKEN.encode() not in f.read()


def test_a_client_with_a_token_tells_an_open_server_apart():
    with LocalCluster(n_workers=1, ncores=1, auth_token=False) as open_cluster:
        with pytest.raises(AuthenticationError, match="without an auth token"):
            Pool(open_cluster.center_address, auth_token=TOKEN)


@pytest.mark.parametrize("role", ["center", "worker"])
def test_binding_a_public_address_without_a_token_is_refused(role):
    args = {"center": [], "worker": ["127.0.0.1:1"]}[role]
    env = {k: v for k, v in __import__("os").environ.items()
           if k != security_module.TOKEN_ENV}
    done = subprocess.run([sys.executable, "-m", f"d3arrow.cli.{role}", *args,
                           "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert "without an auth token" in done.stderr and "--auth-token" in done.stderr


@gen_cluster(n_workers=0, security=Security.from_options(TOKEN))
async def test_garbage_and_silence_before_the_handshake_are_dropped(center, workers, pool):
    host, port = center.address.split(":")
    loop = asyncio.get_running_loop()
    security_module.HANDSHAKE_TIMEOUT, saved = 0.5, security_module.HANDSHAKE_TIMEOUT
    try:
        for junk in [b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", security_module.MAGIC + b"x" * 80,
                     b""]:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(junk)
            data = await asyncio.wait_for(reader.read(), 5)  # the server hangs up
            assert b"D3AUTH" not in data or junk.startswith(security_module.MAGIC)
            writer.close()
        assert (await loop.run_in_executor(None, _tcp_accepts, host, int(port)))
    finally:
        security_module.HANDSHAKE_TIMEOUT = saved
    good = ConnectionPool(security=Security.from_options(TOKEN))
    try:
        assert (await good.rpc(center.address).ncores())["ncores"] == {}
    finally:
        good.close()


def _tcp_accepts(host, port):
    with socket.create_connection((host, port), timeout=5):
        return True


# -- TLS ----------------------------------------------------------------------------------------

def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject, key, issuer, issuer_key, *, ca):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_ca_and_node(directory, name):
    """A throw-away CA and one certificate it signed: {tls_ca, tls_cert, tls_key} paths."""
    ca_key, node_key = _key(), _key()
    ca = _certificate(f"{name}-ca", ca_key, f"{name}-ca", ca_key, ca=True)
    node = _certificate(f"{name}-node", node_key, f"{name}-ca", ca_key, ca=False)
    paths = {k: directory / f"{name}-{k}.pem" for k in ("tls_ca", "tls_cert", "tls_key")}
    paths["tls_ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["tls_cert"].write_bytes(node.public_bytes(serialization.Encoding.PEM))
    paths["tls_key"].write_bytes(node_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    return _write_ca_and_node(directory, "ours"), _write_ca_and_node(directory, "theirs")


def test_mutual_tls_cluster_works_for_its_members_only(tls_files):
    ours, theirs = tls_files
    with LocalCluster(n_workers=2, ncores=1, shm=False, auth_token=TOKEN, **ours) as cluster:
        a, b = cluster.worker_addresses
        with Pool(cluster.center_address, auth_token=TOKEN, shm=False, **ours) as pool:
            x = pool.apply(lambda: np.ones(300_000), workers=[a])
            assert pool.apply(lambda v: v.sum(), [x], workers=[b]).get() == 300_000
            # the caller's own links too: TLS, never the workers' Unix sockets
            links = pool.client.direct._local.links.values()
            assert {type(link._sock) for link in links} == {ssl.SSLSocket}
        # a certificate from another CA, or none at all: no connection
        for files in [theirs, {"tls_ca": ours["tls_ca"]}]:
            with pytest.raises(ConnectionError):
                Pool(cluster.center_address, auth_token=TOKEN, **files)
        # plain TCP to a TLS server: no connection either
        with pytest.raises(ConnectionError):
            Pool(cluster.center_address, auth_token=TOKEN)


def test_tls_needs_both_certificate_and_key(tls_files):
    ours, _ = tls_files
    with pytest.raises(ValueError, match="tls_key"):
        Pool("127.0.0.1:1", tls_cert=ours["tls_cert"])
