"""The hardware limits other figures are compared to, measured in the same run.

- raw loopback TCP: one process ``sendall``s a preallocated buffer, another ``recv_into``s a
  preallocated, already-faulted buffer (the best a Python socket can do here);
- memcpy: ``np.copyto`` into an already-faulted destination.
"""

import socket
import statistics
import subprocess
import sys
import textwrap
import time

import numpy as np

SENDER = textwrap.dedent("""
    import socket, sys
    import numpy as np
    port, nbytes, repeat = map(int, sys.argv[1:])
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(repeat):
            sock.recv(1)  # go
            sock.sendall(memoryview(data))
""")


def socket_throughput(nbytes, repeat=5):
    """Median GB/s of loopback TCP into a preallocated buffer (sender in another process)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        sender = subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(nbytes),
                                   str(repeat)])
        try:
            listener.settimeout(60)
            conn, _ = listener.accept()
            with conn:
                target = np.ones(nbytes, dtype=np.uint8)  # faulted in
                view = memoryview(target)
                seconds = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    conn.sendall(b"g")
                    received = 0
                    while received < nbytes:
                        received += conn.recv_into(view[received:], nbytes - received)
                    seconds.append(time.perf_counter() - start)
        finally:
            sender.wait(timeout=60)
    return nbytes / statistics.median(seconds) / 1e9


def memcpy_bandwidth(nbytes, repeat=5):
    """Median GB/s of ``np.copyto`` between two faulted-in arrays."""
    source = np.random.default_rng(0).random(nbytes // 8)
    target = np.ones_like(source)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(target, source)
        seconds.append(time.perf_counter() - start)
    return nbytes / statistics.median(seconds) / 1e9


if __name__ == "__main__":
    n = 256 * 2**20
    print(f"raw loopback socket 256 MiB: {socket_throughput(n):.2f} GB/s")
    print(f"memcpy 256 MiB: {memcpy_bandwidth(n):.2f} GB/s")
