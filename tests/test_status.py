"""Seeing the cluster: metrics with heartbeats, the center's HTTP routes, d3arrow status."""

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import cloudpickle
import numpy as np
import pytest
from conftest import wait_until
from prometheus_client.parser import text_string_to_metric_families

from d3arrow import LocalCluster, Pool

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests

MiB = 2**20


def fails(x):
    raise ValueError(x)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def busy(cluster):
    """The cluster after 202 tasks, one failure and a same-host transfer of 8 MiB."""
    with Pool(cluster.center_address) as pool:
        pool.map(lambda x: x + 1, range(200))
        with pytest.raises(ValueError):
            pool.apply(fails, [1]).get()
        a, b = cluster.worker_addresses
        data = pool.apply(np.ones, [MiB], workers=[a])  # 8 MiB made on a
        assert pool.apply(np.sum, [data], workers=[b]).get() == MiB  # read on b
        assert wait_until(lambda: pool.status()["totals"]["tasks"] >= 202, timeout=10)
        yield pool


def get(url, token=None):
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.status, reply.headers["Content-Type"], reply.read().decode()


def test_workers_report_what_they_did_with_their_heartbeats(cluster, busy):
    status = busy.status()
    a, b = cluster.worker_addresses
    workers = {w["address"]: w for w in status["workers"]}
    assert set(workers) == {a, b}
    totals = status["totals"]
    assert totals["workers"] == 2 and totals["ncores"] == 2 and totals["clients"] >= 1
    assert totals["tasks"] >= 202 and totals["tasks_failed"] == 1
    assert workers[b]["counters"]["bytes_received_shm"] >= 8 * MiB  # a view, not bytes
    assert workers[b]["counters"]["fetches"] >= 1
    assert workers[a]["counters"]["bytes_sent_shm"] >= 8 * MiB
    for w in workers.values():
        assert w["gauges"]["memory_bytes"] > 10 * MiB  # an interpreter at least
        assert w["gauges"]["store_capacity_bytes"] > 0 and w["last_seen"] < 5
        assert w["gauges"]["connections"] >= 1 and w["counters"]["compute_seconds"] > 0
    assert status["requests"]["heartbeat"] >= 2 and status["requests"]["register"] == 2


def test_the_center_serves_health_status_and_prometheus_metrics(cluster, busy):
    base, token = cluster.dashboard_address, cluster.auth_token
    assert base.startswith("http://127.0.0.1:")
    assert get(base + "health") == (200, "text/plain", "ok\n")  # for probes: no token
    for path in ("", "status.json", "metrics"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(base + path)
        assert refused.value.code == 401
        refused.value.close()
    code, kind, page = get(f"{base}?token={token}")
    assert code == 200 and kind.startswith("text/html") and "status.json" in page
    assert "http" not in page.replace(base, "").split("<script>")[1]  # nothing from outside
    code, kind, text = get(base + "status.json", token)
    assert kind == "application/json" and json.loads(text)["totals"]["tasks"] >= 202
    code, kind, text = get(base + "metrics", token)
    assert code == 200 and kind.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["d3arrow_workers"].samples[0].value == 2
    tasks = {s.labels["worker"]: s.value for s in families["d3arrow_tasks"].samples
             if s.name == "d3arrow_tasks_total"}
    assert set(tasks) == set(cluster.worker_addresses) and sum(tasks.values()) >= 202
    memory = {s.labels["worker"]: s.value for s in families["d3arrow_worker_memory_bytes"].samples}
    assert all(v > 10 * MiB for v in memory.values()) and len(memory) == 2
    shm_in = [s.value for s in families["d3arrow_transfer_bytes"].samples
              if s.labels["direction"] == "received" and s.labels["transport"] == "shm"]
    assert max(shm_in) >= 8 * MiB
    requests = {s.labels["op"]: s.value for s in families["d3arrow_center_requests"].samples}
    assert requests["heartbeat"] >= 2


def test_bad_http_requests_get_errors_and_the_center_stays_up(cluster):
    base, token = cluster.dashboard_address, cluster.auth_token
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(base + "nothing", token)
    assert missing.value.code == 404
    missing.value.close()
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(urllib.request.Request(base + "health", data=b"x"), timeout=10)
    assert posted.value.code == 405
    posted.value.close()
    host, port = base[len("http://"):].rstrip("/").split(":")
    for garbage in (b"\x00\xff garbage\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(garbage)
            answer = sock.recv(100)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400")
    assert get(base + "health") == (200, "text/plain", "ok\n")
    with Pool(cluster.center_address) as pool:  # and the center itself
        assert pool.apply(sum, [[1, 2]]).get() == 3


def test_d3arrow_status_prints_the_workers_and_totals(cluster, busy):
    env = {**os.environ, "D3ARROW_AUTH_TOKEN": cluster.auth_token}
    shown = subprocess.run([sys.executable, "-m", "d3arrow.cli.main", "status",
                            cluster.center_address], env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    for address in cluster.worker_addresses:
        assert address in shown.stdout
    assert "total: 2 workers, 2 cores" in shown.stdout
    as_json = subprocess.run([sys.executable, "-m", "d3arrow.cli.main", "status",
                              cluster.center_address, "--json"], env=env, capture_output=True,
                             text=True, timeout=60)
    found = json.loads(as_json.stdout)
    assert found.keys() == busy.status().keys() and found["totals"]["tasks"] >= 202
    env.pop("D3ARROW_AUTH_TOKEN")
    refused = subprocess.run([sys.executable, "-m", "d3arrow.cli.main", "status",
                              cluster.center_address], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "auth token" in refused.stderr
    nobody = subprocess.run([sys.executable, "-m", "d3arrow.cli.main", "status",
                             cluster.worker_addresses[0]], env={
                                 **env, "D3ARROW_AUTH_TOKEN": cluster.auth_token},
                            capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 1 and "not a center" in nobody.stderr
