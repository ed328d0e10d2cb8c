"""A local Beam job service for the portable runner: `with local_job_service() as port: ...`.

Beam's portable runner submits a job to a job service; `apache_beam.runners.portability.
local_job_service_main` is one that runs jobs on this machine. This starts it in its own process
(as a user would from a shell), waits until it accepts connections, and stops it afterwards. Jobs
then run with `--runner=PortableRunner --job_endpoint=localhost:PORT --environment_type=LOOPBACK`
(portable_args(port)). The tests and the scale harness use it to run every job on the portable
runner as well as on the DirectRunner.
"""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

START_TIMEOUT_SECONDS = 60


def portable_args(port: int) -> list[str]:
    """The pipeline arguments that send a job to the service on `port`, workers in this process."""
    return [
        "--runner=PortableRunner", f"--job_endpoint=localhost:{port}", "--environment_type=LOOPBACK"
    ]


@contextlib.contextmanager
def local_job_service():
    """Start a local job service on a free port; yield the port; stop the service on exit."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    service = subprocess.Popen([
        sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port",
        str(port)
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + START_TIMEOUT_SECONDS
        while time.time() < deadline:  # until it accepts connections
            with contextlib.suppress(OSError):
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            time.sleep(0.2)
        yield port
    finally:
        service.terminate()
        service.wait(timeout=60)
