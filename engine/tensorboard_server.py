"""`--tensorboard`: serve the run's logs on a port for the run's lifetime (main rank only)."""

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from errors import UsageError


def check_port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise UsageError(
                f"--tensorboard needs port {port}, but it is busy ({error.strerror}); "
                "stop whatever holds it or choose another with --tensorboard-port."
            ) from error


@contextlib.contextmanager
def serve(logdir: Path, port: int) -> Iterator[str]:
    """Start TensorBoard on `port`, yield its URL, stop it when the run ends (even on error)."""
    check_port_free(port)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://localhost:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
