"""The status page in a real browser: headless Chromium against a live cluster."""

import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from d3arrow import LocalCluster, Pool

pytestmark = pytest.mark.timeout(180)

# .ci/run installs Debian's chromium; elsewhere the test says what it needs
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
SUMMARY = re.compile(r'<div id="summary">.*? (\d+) tasks run \((\d+) failed\)</div>')


def browse(url, *options, budget_ms=3000):
    """Chromium loads ``url`` and lets its scripts run for ``budget_ms`` of page time."""
    done = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", f"--virtual-time-budget={budget_ms}",
                           *options, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(BROWSER is None, reason="needs Debian's chromium (apt-get install -y "
                                              "chromium; .ci/run installs it)")
def test_the_status_page_shows_the_workers_and_a_task_count_that_grows(tmp_path):
    with LocalCluster(n_workers=2, ncores=1, heartbeat_interval=0.2) as cluster, \
            Pool(cluster.center_address) as pool:
        url = f"{cluster.dashboard_address}?token={cluster.auth_token}"
        stop = threading.Event()

        def work():  # a map runs while the page is looked at
            while not stop.is_set():
                pool.map(time.sleep, [0.002] * 200)

        worker = threading.Thread(target=work)
        worker.start()
        try:
            seen = []
            for _ in range(2):
                page = browse(url, "--dump-dom")
                for address in cluster.worker_addresses:  # what a person sees: the workers
                    assert f"<td>{address}</td>" in page, page[-3000:]
                found = SUMMARY.search(page)
                assert found, page[-3000:]
                seen.append(int(found.group(1)))
                time.sleep(1.0)
            assert seen[1] > seen[0] > 0  # the task count grows while the map runs
            shot = os.environ.get("D3ARROW_SCREENSHOT")  # set to refresh docs' picture
            if shot:
                browse(url, "--window-size=1200,620", f"--screenshot={shot}",
                       budget_ms=15000)
        except BaseException:
            failure = tmp_path / "status-page-failure.png"
            browse(url, "--window-size=1200,620", f"--screenshot={failure}")
            print(f"screenshot of the page at failure: {failure}")
            raise
        finally:
            stop.set()
            worker.join(timeout=60)
