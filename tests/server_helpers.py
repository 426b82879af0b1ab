"""A real uvicorn server on 127.0.0.1, port 0, in a background thread of the test process."""
from __future__ import annotations

import threading
import time

import uvicorn


class RunningServer:
    def __init__(self, app, lifespan: str = "on"):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def stop_process(proc) -> None:
    """Stops a server subprocess by its own pid: SIGINT (graceful shutdown), then SIGKILL after 30 s."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_cli_server(args: list[str], timeout: float = 120.0):
    """`asyncllm serve --port 0 ARGS` in a subprocess → (process, its URL once it serves). The
    caller stops it with stop_process (by its pid)."""
    import os
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "asyncllm.cli", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url, lines = None, []
    deadline = time.monotonic() + timeout
    try:
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            match = re.search(r"serving (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
            assert proc.poll() is None, "".join(lines)
        assert url, "".join(lines)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
