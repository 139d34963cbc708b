"""--tensorboard: a busy port is refused clearly; the server answers during the run and stops after."""

import socket
import time
import urllib.request

import pytest

from engine.tensorboard import check_port_free, serve
from errors import UsageError
from harness import free_port


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(UsageError, match=f"needs port {port}, but it is busy"):
            check_port_free(port)


@pytest.mark.slow
def test_server_answers_while_the_run_lasts_and_stops_after(tmp_path):
    port = free_port()
    with serve(tmp_path, port) as url:
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and status is None:
            try:
                status = urllib.request.urlopen(url, timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
    check_port_free(port)  # the server is gone: its port can be bound again
