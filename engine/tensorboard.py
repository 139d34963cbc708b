"""TensorBoard: the scalars, texts and charts a run logs on its optimizer-step axis (main rank only), and
`--tensorboard`, which serves them on a port for the run's lifetime."""

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


class Scalars:
    """TensorBoard scalars (and texts, charts), on the optimizer-step axis, written by the main rank only."""

    def __init__(self, folder: Path, *, enabled: bool = True, resume_step: int = 0):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops points a killed run logged past its last checkpoint.
            self.writer = SummaryWriter(str(folder), purge_step=resume_step or None)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def text(self, step: int, name: str, value: str) -> None:
        if self.writer is not None:
            self.writer.add_text(name, value, step)

    def figure(self, step: int, name: str, figure: object) -> None:
        """A matplotlib Figure (eval/charts.py) as an image; TensorBoard closes it."""
        if self.writer is not None:
            self.writer.add_figure(name, figure, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
