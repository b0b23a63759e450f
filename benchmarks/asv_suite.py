"""asv suite: ``asv run --python=same --quick`` (configured by the top-level asv.conf.json)."""

import numpy as np

from .measure import (GiB, MiB, _inc, cluster, gather_seconds, peak_rss_growth,
                      scatter_seconds, transfer_seconds)


class _Cluster:
    """Starts a two-worker LocalCluster in setup and stops it in teardown."""

    shm = False

    def setup(self, *params):
        self._context = cluster(shm=self.shm)
        self.local, self.pool = self._context.__enter__()
        self.source, self.target = self.local.worker_addresses

    def teardown(self, *params):
        self._context.__exit__(None, None, None)


class WorkerToWorker:
    """Worker-to-worker transfer throughput, over TCP and co-located through shared memory."""

    params = (["tcp", "shm"], [MiB, 64 * MiB, 256 * MiB, GiB])
    param_names = ["path", "nbytes"]
    timeout = 600
    unit = "GB/s"

    def setup(self, path, nbytes):
        self._context = cluster(shm=path == "shm")
        self.local, self.pool = self._context.__enter__()

    def teardown(self, path, nbytes):
        self._context.__exit__(None, None, None)

    def track_throughput(self, path, nbytes):
        source, target = self.local.worker_addresses
        _, in_worker = transfer_seconds(self.pool, source, target, nbytes, 3)
        return nbytes / float(np.median(in_worker)) / 1e9

    track_throughput.unit = "GB/s"


class ClientTransfers(_Cluster):
    """Scatter from and gather to the client, 256 MiB over TCP."""

    timeout = 300

    def track_scatter(self):
        return 256 * MiB / scatter_seconds(self.pool, self.source, 256 * MiB, 3) / 1e9

    track_scatter.unit = "GB/s"

    def track_gather(self):
        return 256 * MiB / gather_seconds(self.pool, self.source, 256 * MiB, 3) / 1e9

    track_gather.unit = "GB/s"


class Tasks(_Cluster):
    """Small-task throughput and latency on two single-core workers."""

    timeout = 300

    def setup(self):
        super().setup()
        self.pool.map(_inc, range(1000))

    def time_map_10000_tiny(self):
        self.pool.map(_inc, range(10_000))

    def time_apply_round_trip(self):
        self.pool.apply(_inc, [1])


class Memory(_Cluster):
    """Receiving worker's peak RSS growth for a 256 MiB transfer, as a multiple of it."""

    timeout = 300

    def track_peak_rss_over_payload(self):
        return peak_rss_growth(self.local, self.pool, self.source, self.target, 256 * MiB)

    track_peak_rss_over_payload.unit = "x payload"


class Serialization:
    """Serializing 256 MiB of float64: Arrow IPC tensor (d3arrow) against pickle-5."""

    params = ["arrow_ipc", "pickle5_inband", "pickle5_out_of_band"]
    param_names = ["method"]

    def setup(self, method):
        self.array = np.random.default_rng(0).random(256 * MiB // 8)

    def time_serialize(self, method):
        import pickle

        from d3arrow.serialize import serialize

        if method == "arrow_ipc":
            serialize(self.array)
        elif method == "pickle5_inband":
            pickle.dumps(self.array, protocol=5)
        else:
            pickle.dumps(self.array, protocol=5, buffer_callback=lambda b: None)

