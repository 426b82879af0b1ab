"""Entry point of a worker process: `python -m asyncllm.executor.worker_process FD [RANK WORLD RENDEZVOUS BACKEND]`.

With a world size above 1 the process first joins the tensor-parallel group (torch.distributed:
gloo on the CPU, NCCL on CUDA; rendezvous through the file the executor named) and takes its
share of the CPU's threads.

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


def join_group(rank: int, world_size: int, rendezvous: str, backend: str):
    """Joins the tensor-parallel group; → the shared-memory collectives of this host's ranks (None
    where they do not apply: NCCL, not x86-64, or ASYNCLLM_SHM_COLLECTIVES=0)."""
    import torch
    import torch.distributed as dist

    from asyncllm.model.shm_collectives import ShmCollectives, shm_path, shm_supported

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    # Each rank computes its shard with its own threads: split the cores rather than oversubscribe.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if backend != "gloo" or not shm_supported() or os.environ.get("ASYNCLLM_SHM_COLLECTIVES") == "0":
        return None
    path = shm_path(os.path.dirname(rendezvous))

    def agreed(ok: bool) -> bool:  # every rank's answer: all ranks use shared memory, or none does
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        return int(flag) == 0

    shm = None
    try:
        if rank == 0:
            shm = ShmCollectives(path, rank, world_size, create=True)
    except OSError:  # e.g. a full /dev/shm: gloo alone, as the other ranks are told
        pass
    if agreed(rank != 0 or shm is not None):  # rank 0 has made the file
        try:
            shm = shm or ShmCollectives(path, rank, world_size)
        except OSError:
            shm = None
    both = agreed(shm is not None)  # every rank has mapped it: its name can go (no file outlives the group)
    if rank == 0 and os.path.exists(path):
        os.unlink(path)
    if not both and shm is not None:
        shm.close()
        shm = None
    return shm


def serve(conn: Connection, rank: int = 0, world_size: int = 1, shm=None) -> None:
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
                worker = Worker(wire.decode(body, EngineArgs).create_engine_config(), rank=rank,
                                world_size=world_size, shm=shm)
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
    rank, world_size = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, 1)
    shm = join_group(rank, world_size, sys.argv[4], sys.argv[5]) if world_size > 1 else None
    serve(conn, rank, world_size, shm)
    conn.close()


if __name__ == "__main__":
    main()
