"""The center over HTTP: a live status page, ``/status.json``, ``/health`` and Prometheus
``/metrics``, served on the center's own event loop.

A few GET routes need no web framework: requests are read with asyncio streams, answered
and closed. When the cluster has a token, every route but ``/health`` asks for it
(``Authorization: Bearer TOKEN`` or ``?token=TOKEN``, as the page's own requests do).
"""

import asyncio
import hmac
import json
import logging
import urllib.parse
from importlib import resources
from typing import Any

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16384  # a request line and headers; anything longer is refused
READ_SECONDS = 10.0  # a client that sends its request, or reads the answer, no faster
# than this is dropped


class Dashboard:
    """HTTP for ``center`` (its :meth:`~d3arrow.center.Center.status` and token)."""

    def __init__(self, center: Any) -> None:
        self.center = center
        self.address: str | None = None
        self._server: asyncio.base_events.Server | None = None
        self._registry = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._server = await asyncio.start_server(self._serve, host, port,
                                                  limit=MAX_REQUEST_BYTES)
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        self.address = f"http://{bound_host}:{bound_port}/"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader, writer):
        try:
            async with asyncio.timeout(READ_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = self._answer(head.decode("latin-1"))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, UnicodeDecodeError):
            writer.close()
            return
        except Exception as e:  # a bug of ours: say so, keep serving
            logger.warning("dashboard request failed: %s", e, exc_info=True)
            status, content_type, body = "500 Internal Server Error", "text/plain", b"error\n"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        try:
            async with asyncio.timeout(READ_SECONDS):
                await writer.drain()
        except TimeoutError:  # it does not read: drop what is left unsent
            writer.transport.abort()
            return
        except ConnectionError:
            pass
        writer.close()

    def _answer(self, head: str) -> tuple[str, str, bytes]:
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "text/plain", b"not an HTTP request\n"
        method, target, _ = parts
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        url = urllib.parse.urlsplit(target)
        if url.path == "/health":
            return "200 OK", "text/plain", b"ok\n"
        if not self._allowed(url, lines[1:]):
            return ("401 Unauthorized", "text/plain",
                    b"this cluster has a token: add ?token=TOKEN to the address\n")
        if url.path == "/":
            return "200 OK", "text/html; charset=utf-8", _page()
        if url.path == "/status.json":
            return "200 OK", "application/json", json.dumps(self.center.status()).encode()
        if url.path == "/metrics":
            return self._metrics()
        return "404 Not Found", "text/plain", b"routes: / /status.json /metrics /health\n"

    def _allowed(self, url, header_lines) -> bool:
        token = self.center.security.token
        if token is None:
            return True
        given = urllib.parse.parse_qs(url.query).get("token", [""])[0]
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "authorization" and value.strip().startswith("Bearer "):
                given = value.strip()[len("Bearer "):]
        token = token if isinstance(token, bytes) else token.encode()
        return hmac.compare_digest(given.encode(), token)

    def _metrics(self) -> tuple[str, str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self.center))
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)


# (metric name, help, where in a worker's status, key): one per worker, labelled by it
_WORKER_COUNTERS = [
    ("d3arrow_tasks", "Tasks a worker ran", "tasks"),
    ("d3arrow_tasks_failed", "Tasks that raised", "tasks_failed"),
    ("d3arrow_compute_seconds", "Seconds spent running tasks", "compute_seconds"),
    ("d3arrow_fetches", "Values fetched from peers", "fetches"),
]
_WORKER_GAUGES = [
    ("d3arrow_worker_memory_bytes", "Memory the worker owns (private + its store's values)",
     "memory_bytes"),
    ("d3arrow_worker_memory_limit_bytes", "The worker's memory limit (0: none)",
     "memory_limit_bytes"),
    ("d3arrow_worker_spilled_bytes", "Bytes of values spilled to disk", "spilled_bytes"),
    ("d3arrow_worker_store_used_bytes", "Bytes of values in the shared store",
     "store_used_bytes"),
    ("d3arrow_worker_store_capacity_bytes", "Size of the shared store",
     "store_capacity_bytes"),
    ("d3arrow_worker_keys", "Values held", "keys"),
    ("d3arrow_worker_tasks_running", "Tasks running now", "calls_running"),
    ("d3arrow_worker_paused", "1 while over the memory pause mark", "paused"),
    ("d3arrow_worker_event_loop_lag_seconds", "Worst event loop lag since the last heartbeat",
     "loop_lag_seconds"),
    ("d3arrow_worker_connections", "Connections open to the worker", "connections"),
]


class _Collector:
    """Prometheus metric families from the center's status, built when scraped."""

    def __init__(self, center: Any) -> None:
        self.center = center

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.center.status()
        workers, totals = status["workers"], status["totals"]
        for name, text, key in (("d3arrow_workers", "Workers registered", "workers"),
                                ("d3arrow_cores", "Cores of the registered workers", "ncores"),
                                ("d3arrow_keys", "Keys held on the workers", "keys"),
                                ("d3arrow_clients", "Clients connected", "clients")):
            yield GaugeMetricFamily(name, text, value=totals[key])
        requests = CounterMetricFamily("d3arrow_center_requests", "Requests the center "
                                       "handled, by operation", labels=["op"])
        for op, count in sorted(status["requests"].items()):
            requests.add_metric([op], count)
        yield requests
        for name, text, key in _WORKER_COUNTERS:
            family = CounterMetricFamily(name, text, labels=["worker"])
            for w in workers:
                family.add_metric([w["address"]], w["counters"].get(key, 0))
            yield family
        for unit in ("bytes", "values"):
            family = CounterMetricFamily(f"d3arrow_transfer_{unit}", f"{unit.capitalize()} "
                                         f"sent and received", labels=["worker", "direction",
                                                                       "transport"])
            for w in workers:
                for direction in ("sent", "received"):
                    for transport in ("tcp", "shm"):
                        family.add_metric([w["address"], direction, transport],
                                          w["counters"].get(f"{unit}_{direction}_{transport}", 0))
            yield family
        ncores = GaugeMetricFamily("d3arrow_worker_ncores", "Cores a worker offers",
                                   labels=["worker"])
        seen = GaugeMetricFamily("d3arrow_worker_last_seen_seconds", "Seconds since the "
                                 "worker's last heartbeat", labels=["worker"])
        for w in workers:
            ncores.add_metric([w["address"]], w["ncores"])
            seen.add_metric([w["address"]], w["last_seen"])
        yield ncores
        yield seen
        for name, text, key in _WORKER_GAUGES:
            family = GaugeMetricFamily(name, text, labels=["worker"])
            for w in workers:
                family.add_metric([w["address"]], float(w["gauges"].get(key, 0)))
            yield family


def _page() -> bytes:
    return resources.files(__package__).joinpath("status.html").read_bytes()
