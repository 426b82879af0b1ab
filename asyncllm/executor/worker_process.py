"""Entry point of a worker process: `python -m asyncllm.executor.worker_process FD`.

Reads calls from the socket FD (method name, newline, msgpack payload), runs them on a
Worker, and answers `ok\n<payload>` or `error\n<traceback>`. Exits on `shutdown`, on EOF
(the engine went away) and, from a watcher thread, as soon as its parent process is gone.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


def _die_with_parent(parent: int, interval: float = 0.25) -> None:
    """Exits when the engine process is gone, even mid-step. (Not PR_SET_PDEATHSIG: it fires when
    the *thread* that started us exits, and engines are loaded in a passing thread.)"""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="asyncllm-parent-watch", daemon=True).start()


def serve(conn: Connection) -> None:
    from asyncllm.config import EngineArgs
    from asyncllm.core.sched_output import SchedulerOutput
    from asyncllm.executor import wire
    from asyncllm.worker.worker import CacheConfig, Worker

    worker: Worker | None = None
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            break
        method, _, body = message.partition(b"\n")
        if method == b"shutdown":
            break
        try:
            if method == b"execute":
                started = time.perf_counter()
                output = worker.execute(wire.decode(body, SchedulerOutput))
                output.worker_seconds = time.perf_counter() - started
                reply = wire.encode(output)
            elif method == b"config":
                worker = Worker(wire.decode(body, EngineArgs).create_engine_config())
                reply = b""
            elif method == b"load":
                reply = wire.encode(worker.load_model())
            elif method == b"init_cache":
                worker.init_cache(wire.decode(body, CacheConfig))
                reply = b""
            else:
                raise ValueError(f"unknown call {method!r}")
        except Exception:  # noqa: BLE001 - reported to the engine, which decides
            conn.send_bytes(b"error\n" + traceback.format_exc().encode())
            continue
        conn.send_bytes(b"ok\n" + reply)
    if worker is not None:
        worker.shutdown()


def main() -> None:
    _die_with_parent(os.getppid())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    conn = Connection(int(sys.argv[1]))
    serve(conn)
    conn.close()


if __name__ == "__main__":
    main()
