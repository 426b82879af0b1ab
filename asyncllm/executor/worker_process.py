"""Entry point of a worker process:
`python -m asyncllm.executor.worker_process FD [RANK WORLD RENDEZVOUS BACKEND TP]`.

With a world size above 1 the process first joins the group of all ranks (torch.distributed:
gloo on the CPU, NCCL on CUDA; rendezvous through the file the executor named) and its stage's
tensor-parallel group (TP ranks per pipeline stage), and takes its share of the CPU's threads.

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
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


def _die_with_parent(parent: int, interval: float = 0.25) -> None:
    """Exits when the engine process is gone, even mid-step. (Not PR_SET_PDEATHSIG: it fires when
    the *thread* that started us exits, and engines are loaded in a passing thread.)"""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="asyncllm-parent-watch", daemon=True).start()


@dataclass
class TensorGroup:
    """A rank's tensor-parallel group: torch.distributed's (None: every rank, as without pipeline
    stages) and its shared-memory collectives (None where they do not apply)."""

    group: Any = None
    shm: Any = None


def join_group(rank: int, world_size: int, init_method: str, backend: str, shm_dir: str | None,
               tp_size: int | None = None) -> TensorGroup:
    """Joins the group of all ranks at `init_method` (file:// or tcp://), then, where pipeline stages
    hold several ranks each, one group per stage (ranks are stage-major); → this rank's tensor-
    parallel group, with the shared-memory collectives of its ranks (not where they do not apply:
    no `shm_dir` as the ranks are not on one host, NCCL, not x86-64, or ASYNCLLM_SHM_COLLECTIVES=0)."""
    import torch
    import torch.distributed as dist

    from asyncllm.model.shm_collectives import ShmCollectives, shm_path, shm_supported

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    tp_size = tp_size or world_size
    stage, tp_rank = divmod(rank, tp_size)
    result = TensorGroup()
    if tp_size < world_size:  # every rank creates every stage's group, in the same order
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(world_size // tp_size)]
        result.group = groups[stage] if tp_size > 1 else None
    if (tp_size == 1 or shm_dir is None or backend != "gloo" or not shm_supported()
            or os.environ.get("ASYNCLLM_SHM_COLLECTIVES") == "0"):
        return result
    path = shm_path(shm_dir) + (f"-stage{stage}" if tp_size < world_size else "")
    leader = tp_rank == 0

    def agreed(ok: bool) -> bool:  # every rank's answer: all ranks use shared memory, or none does
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        return int(flag) == 0

    shm = None
    try:
        if leader:
            shm = ShmCollectives(path, tp_rank, tp_size, create=True)
    except OSError:  # e.g. a full /dev/shm: gloo alone, as the other ranks are told
        pass
    if agreed(not leader or shm is not None):  # each group's first rank has made its file
        try:
            shm = shm or ShmCollectives(path, tp_rank, tp_size)
        except OSError:
            shm = None
    both = agreed(shm is not None)  # every rank has mapped it: its name can go (no file outlives the group)
    if leader and os.path.exists(path):
        os.unlink(path)
    if not both and shm is not None:
        shm.close()
        shm = None
    result.shm = shm
    return result


def _place(args, rank: int) -> None:
    """Each rank of each data-parallel replica computes with its own threads: the host's cores are
    split between them rather than oversubscribed (the C kernels follow torch's thread count). On
    CUDA, replica r's ranks take devices r * world_size + rank (before anything touches the device)."""
    import torch

    processes = args.world_size * args.data_parallel_size
    if processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    if args.device != "cpu" and args.data_parallel_size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(args.data_parallel_rank * args.world_size + rank)


class WorkerCalls:
    """The calls a worker answers, whatever carries them (a socket here, a Ray actor's method call):
    `handle(method, body)` → `ok\n<msgpack>` or `error\n<traceback>`."""

    def __init__(self, rank: int = 0, world_size: int = 1, tensor_group: TensorGroup | None = None):
        self.rank, self.world_size = rank, world_size
        self.tensor_group = tensor_group or TensorGroup()
        self.worker = None

    def handle(self, method: bytes, body: bytes) -> bytes:
        try:
            return b"ok\n" + self._run(method, body)
        except Exception:  # noqa: BLE001 - reported to the engine, which decides
            return b"error\n" + traceback.format_exc().encode()

    def _run(self, method: bytes, body: bytes) -> bytes:
        from asyncllm.config import EngineArgs
        from asyncllm.core.sched_output import SchedulerOutput
        from asyncllm.executor import wire
        from asyncllm.worker.worker import CacheConfig, Worker

        if method == b"execute":
            started = time.perf_counter()
            output = self.worker.execute(wire.decode(body, SchedulerOutput))
            output.worker_seconds = time.perf_counter() - started
            return wire.encode(output)
        if method == b"config":
            args = wire.decode(body, EngineArgs)
            _place(args, self.rank)
            self.worker = Worker(args.create_engine_config(), rank=self.rank, world_size=self.world_size,
                                 shm=self.tensor_group.shm, tp_group=self.tensor_group.group)
            return b""
        if method == b"load":
            return wire.encode(self.worker.load_model())
        if method == b"init_cache":
            self.worker.init_cache(wire.decode(body, CacheConfig))
            return b""
        raise ValueError(f"unknown call {method!r}")

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None


def serve(conn: Connection, rank: int = 0, world_size: int = 1, tensor_group: TensorGroup | None = None) -> None:
    calls = WorkerCalls(rank, world_size, tensor_group)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            break
        method, _, body = message.partition(b"\n")
        if method == b"shutdown":
            break
        conn.send_bytes(calls.handle(method, body))
    calls.close()


def main() -> None:
    _die_with_parent(os.getppid())
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    conn = Connection(int(sys.argv[1]))
    rank, world_size = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (0, 1)
    rendezvous = sys.argv[4] if world_size > 1 else ""
    group = join_group(rank, world_size, f"file://{rendezvous}", sys.argv[5], os.path.dirname(rendezvous),
                       int(sys.argv[6])) if world_size > 1 else None
    serve(conn, rank, world_size, group)
    conn.close()


if __name__ == "__main__":
    main()
