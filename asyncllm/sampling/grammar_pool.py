"""Where grammars compile: worker processes that can be killed, in two lanes, and a disk cache.

- `CompileWorker` is one `grammar_worker.py` process with a capped address space. A compile
  that passes its deadline is ended by killing that process (by its own pid), which gives
  all its memory back; a replacement starts at once, so the next compile does not wait for it.
- `CompileLane` is a few workers behind a bounded queue. `GrammarCompiler` keeps a light
  lane (specs estimated cheap, a short budget each) apart from a heavy one, so a slow spec
  can never hold the worker a `choice` or a small schema needs.
- `DiskCache` keeps the binary form of indexes that were slow to build (json_object: ~7 s
  to compile, 35 ms to load), keyed by outlines-core's version, the vocabulary and the regex.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from asyncllm.sampling import grammar_worker

logger = logging.getLogger(__name__)

_WORKER_SCRIPT = os.path.abspath(grammar_worker.__file__)
_LEN = grammar_worker._LEN


class CompileTimeout(Exception):
    """The compile passed its deadline; the worker was killed."""


class CompileFailed(Exception):
    """outlines-core refused the regex, or the worker died (memory cap)."""

    def __init__(self, message: str, memory: bool = False):
        super().__init__(message)
        self.memory = memory


class LaneBusy(Exception):
    """More compiles are queued in the lane than it admits."""


def _read_exact(fd: int, size: int, deadline: float) -> bytes | None:
    """`size` bytes from a pipe, or None at EOF; CompileTimeout past the deadline."""
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        wait = deadline - time.monotonic()
        if wait <= 0:
            raise CompileTimeout()
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            continue
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class CompileWorker:
    """One compile process, started on demand and again after each kill."""

    def __init__(self, vocabulary_payload: bytes, eos_token_id: int, memory_bytes: int, niceness: int = 0):
        self._vocabulary = vocabulary_payload
        self._eos = eos_token_id
        self._memory = memory_bytes
        self._niceness = niceness
        self._proc: subprocess.Popen | None = None
        self._initialised = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Starts the process and sends it the vocabulary without waiting for its answer."""
        self._proc = subprocess.Popen([sys.executable, "-I", _WORKER_SCRIPT], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self._initialised = False
        header = json.dumps({"op": "init", "eos": self._eos, "memory_bytes": self._memory,
                             "niceness": self._niceness}).encode()
        self._send(header, self._vocabulary)

    def _send(self, *frames: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        for frame in frames:
            self._proc.stdin.write(_LEN.pack(len(frame)) + frame)

    def _receive(self, deadline: float) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        head = _read_exact(fd, _LEN.size, deadline)
        if head is None:
            return None
        return _read_exact(fd, _LEN.unpack(head)[0], deadline)

    def compile(self, regex: str, timeout: float) -> tuple[bytes, float]:
        """(the Index's binary form, seconds the compile took in the worker)."""
        deadline = time.monotonic() + timeout
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        try:
            if not self._initialised:
                if self._receive(deadline + 30) is None:  # the vocabulary load is not the spec's time
                    raise CompileFailed("the grammar worker did not start")
                self._initialised = True
            self._send(json.dumps({"op": "compile", "regex": regex}).encode())
            header = self._receive(deadline)
            if header is None:
                raise CompileFailed("the grammar compile ran out of its memory limit", memory=True)
            reply = json.loads(header)
            if not reply["ok"]:
                raise CompileFailed(reply["error"], memory=bool(reply.get("memory")))
            data = self._receive(deadline)
            if data is None:
                raise CompileFailed("the grammar worker died while sending its result")
            return data, float(reply["seconds"])
        except CompileTimeout:
            self.restart()
            raise
        except (BrokenPipeError, CompileFailed) as exc:
            if self._proc is not None and self._proc.poll() is not None:
                self.restart()  # it died: memory cap, or killed from outside
            if isinstance(exc, BrokenPipeError):
                raise CompileFailed("the grammar worker died", memory=True) from None
            raise

    def restart(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


class CompileLane:
    """`workers` compile processes behind a queue of at most `max_queued` compiles."""

    def __init__(self, name: str, workers: int, max_queued: int, make_worker: Callable[[], CompileWorker],
                 prestart: bool = False):
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"asyncllm-grammar-{name}")
        self._free: queue.SimpleQueue[CompileWorker] = queue.SimpleQueue()
        self._workers = [make_worker() for _ in range(workers)]
        for worker in self._workers:
            if prestart:
                worker.start()  # its ~0.15 s start-up is then not the first request's
            self._free.put(worker)
        self._max_queued = max_queued
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, task: Callable[[CompileWorker], None]) -> None:
        """Runs `task(worker)` on a free worker; LaneBusy when the queue is full."""
        with self._lock:
            if self._pending >= self._max_queued:
                raise LaneBusy(f"{self._pending} grammars are already compiling in the {self.name} lane")
            self._pending += 1

        def run() -> None:
            worker = self._free.get()
            try:
                task(worker)
            finally:
                self._free.put(worker)
                with self._lock:
                    self._pending -= 1

        self._pool.submit(run)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for worker in self._workers:
            worker.close()


def vocabulary_fingerprint(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


class DiskCache:
    """Binary indexes that took long to build, one file each, at most `max_bytes` in all."""

    def __init__(self, root: Path, vocabulary: str, max_bytes: int):
        from importlib.metadata import version

        self._dir = root / f"outlines-core-{version('outlines_core')}" / vocabulary
        self._max_bytes = max_bytes

    def _path(self, regex: str) -> Path:
        return self._dir / (hashlib.sha256(regex.encode("utf-8", "surrogatepass")).hexdigest() + ".idx")

    def get(self, regex: str) -> bytes | None:
        try:
            return self._path(regex).read_bytes()
        except OSError:
            return None

    def put(self, regex: str, data: bytes) -> None:
        if len(data) > self._max_bytes:
            return
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            path = self._path(regex)
            partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            partial.write_bytes(data)
            os.replace(partial, path)  # readers never see half a file
            self._trim()
        except OSError as exc:  # a read-only or full disk only costs the next start a compile
            logger.warning("grammar disk cache not written: %s", exc)

    def _trim(self) -> None:
        files = sorted(self._dir.glob("*.idx"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self._max_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
