"""MultiprocExecutor: the workers run in their own processes (one per tensor-parallel rank),
one step per round trip.

The process is started as `python -m asyncllm.executor.worker_process` (never by
re-importing the caller's __main__, as multiprocessing's spawn would), connected by a
socket pair framed by multiprocessing's Connection. The engine config and each step cross
as msgpack (msgspec, typed dataclasses; no pickle). A worker that dies is noticed at once:
a pending step sees EOF, and a watcher thread (waiting on the process) tells the engine
even when it is idle. The worker exits when its parent process is gone, and on EOF.

With `tensor_parallel_size` × `pipeline_parallel_size` N > 1, N such processes join one
torch.distributed group (gloo on the CPU, NCCL on CUDA; rendezvous through a file in a private
temporary folder); each step goes to every rank, which run it together (the collectives and the
stages' sends are inside the model), and the last rank's output is the engine's: the last
pipeline stage samples, and tensor-parallel ranks all gather the whole vocabulary's logits and
sample them alike. Steps may be sent before the previous ones are read (pipeline stages overlap);
each channel answers in order.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection

from asyncllm.config import EngineConfig
from asyncllm.errors import EngineDeadError
from asyncllm.executor import wire
from asyncllm.executor.abstract import RemoteWorkersExecutor


class WorkerError(RuntimeError):
    """The worker raised while handling a call (its traceback is in the message)."""


def reply_bodies(method: bytes, replies: list[bytes]) -> list[bytes]:
    """Every rank's `ok\n<body>` → the bodies, by rank; a rank's `error\n<traceback>` raises WorkerError."""
    for rank, reply in enumerate(replies):
        status, _, body = reply.partition(b"\n")
        if status != b"ok":
            where = "the worker process" if len(replies) == 1 else f"the worker process of rank {rank}"
            raise WorkerError(f"{where} failed in {method.decode()}: {body.decode(errors='replace')}")
    return [reply.partition(b"\n")[2] for reply in replies]


class MultiprocExecutor(RemoteWorkersExecutor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        world_size = config.args.world_size
        self._rendezvous_dir = tempfile.mkdtemp(prefix="asyncllm-tp-") if world_size > 1 else None
        self.processes: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        for rank in range(world_size):
            ours, theirs = socket.socketpair()
            argv = [sys.executable, "-m", "asyncllm.executor.worker_process", str(theirs.fileno())]
            if world_size > 1:  # tensor parallel: the rank joins a torch.distributed group
                argv += [str(rank), str(world_size), os.path.join(self._rendezvous_dir, "rendezvous"),
                         "gloo" if config.device.type == "cpu" else "nccl", str(config.args.tensor_parallel_size)]
            self.processes.append(subprocess.Popen(argv, pass_fds=(theirs.fileno(),)))
            theirs.close()  # only the worker holds its end: its death is our EOF
            self._conns.append(Connection(os.dup(ours.fileno())))
            ours.close()
        self.process = self.processes[0]
        self._lock = threading.Lock()  # one call on the channels at a time
        self._closing = False
        self._watchers = [threading.Thread(target=self._watch, args=(process,), name="asyncllm-worker-watch",
                                           daemon=True) for process in self.processes]
        for watcher in self._watchers:
            watcher.start()
        self._call(b"config", wire.encode(config.args))

    @property
    def pid(self) -> int:
        return self.process.pid

    # ------------------------------------------------------------------ calls

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        for process in self.processes:
            if process.poll() is not None:
                raise EngineDeadError(self._death_reason(process))

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        for process, conn in zip(self.processes, self._conns):
            if self._dead is None and process.poll() is None:
                try:
                    with self._lock:
                        conn.send_bytes(b"shutdown\n")
                except OSError:
                    pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()  # by its own pid
                process.wait()
        for conn in self._conns:
            conn.close()
        if self._rendezvous_dir is not None:
            from asyncllm.model.shm_collectives import shm_path

            path = shm_path(self._rendezvous_dir)
            if os.path.exists(path):  # the ranks unlink it once mapped; not if they died first
                os.unlink(path)
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)

    def _start(self, method: bytes, payload: bytes):
        """Writes the call to every rank (they run it together: collectives inside); the replies
        are read by the returned collect(timeout), each channel in order."""
        self._send(method, payload)
        return lambda timeout: self._collect(method, timeout)

    def _send(self, method: bytes, payload: bytes) -> None:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            try:
                for conn in self._conns:
                    conn.send_bytes(method + b"\n" + payload)
            except (EOFError, OSError) as exc:
                self._lost(0, exc)

    def _collect(self, method: bytes, timeout: float | None) -> list[bytes]:
        """Every rank's reply to the oldest call not yet read. A rank that has not answered within
        `timeout` seconds is deemed hung (e.g. stopped): every rank is stopped, the engine dies."""
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            replies = []
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                for rank, conn in enumerate(self._conns):
                    if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
                        self._mark_dead(f"the worker process of rank {rank} (pid {self.processes[rank].pid}) did "
                                        f"not finish a step within {timeout:g} s (execute_model_timeout): hung")
                        self._stop_all()
                        raise EngineDeadError(self._dead)
                    replies.append(conn.recv_bytes())
            except (EOFError, OSError) as exc:
                self._lost(len(replies), exc)
        return reply_bodies(method, replies)

    def _lost(self, rank: int, exc: BaseException) -> None:
        """A channel broke: the engine dies of whichever worker died (else of rank `rank`'s)."""
        dead = next((p for p in self.processes if p.poll() is not None), None)
        if dead is None:
            dead = self.processes[rank]
            dead.wait(timeout=5)
        self._mark_dead(self._death_reason(dead))
        raise EngineDeadError(self._dead) from exc

    # ------------------------------------------------------------------ death

    def _death_reason(self, process: subprocess.Popen) -> str:
        code = process.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"the worker process (pid {process.pid}) {how}"

    def _watch(self, process: subprocess.Popen) -> None:
        process.wait()
        if not self._closing:
            self._mark_dead(self._death_reason(process))
            # The other ranks would wait in their next collective for the dead one: stop them (by
            # pid), which also ends a step this executor is waiting on.
            self._stop_all()

    def _stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()  # by its own pid (a stopped process dies of SIGKILL too)
