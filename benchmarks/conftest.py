"""Clusters for the pytest-benchmark suite: real processes on 127.0.0.1, one per module."""

import pytest

from .measure import cluster


@pytest.fixture(scope="module")
def tcp():
    """(LocalCluster, Pool) with --no-shm workers: every transfer over TCP."""
    with cluster(shm=False) as pair:
        yield pair


@pytest.fixture(scope="module")
def shm():
    """(LocalCluster, Pool) with shared-memory stores: co-located transfers."""
    with cluster(shm=True) as pair:
        yield pair
