"""GrammarCompiler: a structured-output spec → an outlines-core Index, bounded and killable.

1. `plan` turns the spec into a regex and refuses, before anything compiles, what would
   be too costly (size, depth and automaton bounds of `StructuredLimits`).
2. Equal specs share one compile (an LRU bounded by count and by index bytes; failures are
   remembered for a minute, so a hostile spec sent again is refused without compiling).
3. What is left compiles in a worker process (`grammar_pool`). Specs estimated cheap go to
   a light lane of their own kind (choice, json, regex: one worker each), with a short
   budget, past which they move to the heavy lane; the rest go to the heavy lane under
   the per-request deadline. So a client's slow regexes can hold the regex lane for at
   most the budget and the heavy lane's workers, never the lanes choices and schemas use.
   A compile past its deadline or its memory cap is killed; its memory goes back to the
   OS with the process.
4. Indexes that were slow to build are kept on disk; json_object can be warmed at start.
5. Context-free grammars (Lark, GBNF) are not regular: llguidance takes them (`lark_grammar`),
   in this process, in the same cache.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from asyncllm.errors import EngineOverloadedError
from asyncllm.sampling.grammar_pool import (
    CompileFailed,
    CompileLane,
    CompileTimeout,
    CompileWorker,
    DiskCache,
    LaneBusy,
    vocabulary_fingerprint,
)
from asyncllm.sampling.lark_grammar import LarkGrammars
from asyncllm.sampling.structured import (
    GrammarError,
    OutlinesGrammar,
    StructuredLimits,
    StructuredOutputs,
    plan,
)

logger = logging.getLogger(__name__)

# A compile slower than this is worth a file in the disk cache.
_DISK_CACHE_MIN_SECONDS = 0.25
# A failed compile (too slow, too big, invalid) is refused again without compiling for this long.
_FAILURE_MEMORY_S = 60.0
# The json_object grammar is the server's own (not a client's spec): no per-request limit.
_BUILTIN_TIMEOUT_S = 300.0
# Cheap specs compile in a lane of their kind, so no kind of request can hold every worker.
_LIGHT_LANES = ("choice", "json", "regex")


class GrammarBusyError(EngineOverloadedError):
    """Too many grammars are compiling; retry later."""


def token_bytes_vocabulary(tokenizer) -> tuple[dict[bytes, list[int]], int]:
    """{raw token bytes: [token ids]} of the non-special tokens, and the EOS id, for outlines-core."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    unicode_to_byte = {v: k for k, v in bytes_to_unicode().items()}
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(decoder)
    special = set(tokenizer.all_special_ids)
    vocab: dict[bytes, list[int]] = {}
    byte_token = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
    for token, idx in tokenizer.get_vocab().items():
        if idx in special:
            continue
        if byte_level and all(c in unicode_to_byte for c in token):
            raw = bytes(unicode_to_byte[c] for c in token)
        elif (m := byte_token.match(token)) is not None:
            raw = bytes([int(m.group(1), 16)])
        else:
            raw = token.replace("\u2581", " ").encode()
        if raw:
            vocab.setdefault(raw, []).append(idx)
    return vocab, tokenizer.eos_token_id


def default_cache_dir() -> Path:
    return Path(os.environ.get("ASYNCLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "asyncllm")) / "grammars"


@dataclass
class Compilation:
    """A spec's shared compile: the Future of its Index and when a request may stop waiting."""

    future: Future
    deadline: float
    index_bytes: int = 0
    failed_at: float | None = None


class GrammarCompiler:
    def __init__(self, tokenizer, limits: StructuredLimits | None = None, cache_dir: Path | None = None):
        self.tokenizer = tokenizer
        self.limits = limits or StructuredLimits()
        self._cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Compilation] = OrderedDict()
        self._cached_bytes = 0
        self._lanes: dict[str, CompileLane] | None = None
        self._disk: DiskCache | None = None
        self._lark = LarkGrammars(tokenizer, self.limits)
        self._closed = False

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def _ensure_lanes(self) -> dict[str, CompileLane]:
        """The worker lanes, made on first use (building the vocabulary takes ~0.3 s); the light
        workers start at once, so that their start-up is not the first request's."""
        if self._lanes is None:
            mapping, eos = token_bytes_vocabulary(self.tokenizer)
            # Canonical (sorted) so that its fingerprint, the disk cache's key, is the same in every process.
            payload = json.dumps(sorted([token.hex(), sorted(ids)] for token, ids in mapping.items())).encode()
            limits = self.limits

            def worker(niceness: int) -> Callable[[], CompileWorker]:
                return lambda: CompileWorker(payload, eos, limits.worker_memory_bytes, niceness)

            # Compiles yield the CPU to the engine thread, the heavy ones to the light ones too.
            self._lanes = {kind: CompileLane(kind, 1, max(64, limits.max_queued_compiles), worker(5), prestart=True)
                           for kind in _LIGHT_LANES}
            self._lanes["heavy"] = CompileLane("heavy", limits.compile_workers, limits.max_queued_compiles,
                                               worker(15))
            if limits.disk_cache_bytes > 0:
                self._disk = DiskCache(self._cache_dir, vocabulary_fingerprint(payload), limits.disk_cache_bytes)
        return self._lanes

    def worker_pids(self) -> list[int]:
        """The compile processes now alive (tests stop nothing by name)."""
        with self._lock:
            return [] if self._lanes is None else [pid for lane in self._lanes.values() for pid in lane.pids]

    def start(self) -> None:
        """Builds the vocabulary and starts the light workers now rather than on the first request."""
        with self._lock:
            self._ensure_lanes()

    def warm_up(self) -> Future:
        """start(), then compiles json_object in the background (from the disk cache when it is there)."""
        self.start()
        return self.submit(StructuredOutputs(json_object=True)).future

    def submit(self, spec: StructuredOutputs) -> Compilation:
        """Validates now (GrammarError, GrammarBusyError); compiles in a worker process."""
        if spec.grammar is not None:
            return self._submit_grammar(spec)
        regex, cost = plan(spec, self.limits)
        key = spec.key()
        builtin = spec.json_object
        now = time.monotonic()
        with self._lock:
            if self._closed:
                raise GrammarError("the grammar compiler is shut down")
            entry = self._cache.get(key)
            if entry is not None and (entry.failed_at is None or now - entry.failed_at < _FAILURE_MEMORY_S):
                self._cache.move_to_end(key)
                if not entry.future.done():
                    return entry  # shares the running compile and its deadline
                return Compilation(entry.future, now + self.limits.compile_timeout_s, entry.index_bytes)
            self._ensure_lanes()
            limit = _BUILTIN_TIMEOUT_S if builtin else self.limits.compile_timeout_s
            entry = Compilation(Future(), now + limit)
            cheap = (not builtin and cost.positions <= self.limits.light_max_positions
                     and cost.wide_positions <= self.limits.light_max_wide_positions)
            try:
                self._start(regex, entry, spec.kind if cheap else "heavy")
            except LaneBusy as exc:
                raise GrammarBusyError(f"{exc}; retry later") from None
            self._cache[key] = entry
            self._evict()
            return entry

    def _submit_grammar(self, spec: StructuredOutputs) -> Compilation:
        """A Lark/GBNF grammar: llguidance checks and builds it on its thread; shared like an Index."""
        key = spec.key()
        now = time.monotonic()
        with self._lock:
            if self._closed:
                raise GrammarError("the grammar compiler is shut down")
            entry = self._cache.get(key)
            if entry is not None and entry.future.done() and entry.future.exception() is None:
                self._cache.move_to_end(key)
                return Compilation(entry.future, now + self.limits.compile_timeout_s)
            if entry is not None and not entry.future.done():
                return entry
            entry = Compilation(self._lark.submit(spec), now + self.limits.compile_timeout_s)
            self._cache[key] = entry
            self._evict()
            return entry

    def _start(self, regex: str, entry: Compilation, lane_name: str) -> None:
        lanes = self._lanes
        if lanes is None:
            raise GrammarError("the grammar compiler is shut down")
        light = lane_name != "heavy"
        lanes[lane_name].submit(lambda worker: self._run(worker, regex, entry, light))

    def _run(self, worker: CompileWorker, regex: str, entry: Compilation, light: bool) -> None:
        """In a lane thread: disk cache, else the worker; sets the entry's Future."""
        from outlines_core import Index

        try:
            data = self._disk.get(regex) if self._disk is not None else None
            if data is None:
                data = self._compile(worker, regex, entry, light)
                if data is None:
                    return  # moved to the heavy lane
            index = Index.from_binary(data)
        except Exception as exc:  # noqa: BLE001 - the request's error
            self._failed(entry, exc if isinstance(exc, (GrammarError, EngineOverloadedError))
                         else GrammarError(f"cannot build the token automaton: {exc}"))
            return
        with self._lock:
            entry.index_bytes = len(data)
            self._cached_bytes += len(data)
            self._evict()
        entry.future.set_result(OutlinesGrammar(index))

    def _compile(self, worker: CompileWorker, regex: str, entry: Compilation, light: bool) -> bytes | None:
        limits = self.limits
        remaining = entry.deadline - time.monotonic()
        if remaining <= 0:
            raise GrammarError(f"compiling the structure took longer than the limit "
                               f"({limits.compile_timeout_s:g} s, grammar_compile_timeout)")
        try:
            data, seconds = worker.compile(regex, min(remaining, limits.light_budget_s) if light else remaining)
        except CompileTimeout:
            if light and entry.deadline > time.monotonic():
                try:
                    self._start(regex, entry, "heavy")  # slower than estimated: the heavy lane takes it
                except LaneBusy as exc:
                    raise GrammarBusyError(f"{exc}; retry later") from None
                return None
            raise GrammarError(f"compiling the structure took longer than the limit ({limits.compile_timeout_s:g} "
                               "s, grammar_compile_timeout); the compile was stopped") from None
        except CompileFailed as exc:
            if exc.memory:
                raise GrammarError(f"compiling the structure needs more than the grammar worker's memory limit "
                                   f"({limits.worker_memory_bytes >> 20} MiB); simplify it") from None
            raise GrammarError(f"cannot build the token automaton: {exc}") from None
        if len(data) > limits.max_index_bytes:
            raise GrammarError(f"the structure's token automaton takes {len(data) >> 20} MiB; the limit is "
                               f"{limits.max_index_bytes >> 20} MiB (grammar_max_index_bytes): bound fewer "
                               "free-text characters (e.g. a smaller maxLength)")
        if seconds >= _DISK_CACHE_MIN_SECONDS and self._disk is not None:
            self._disk.put(regex, data)
        return data

    def _failed(self, entry: Compilation, exc: BaseException) -> None:
        with self._lock:
            entry.failed_at = time.monotonic()
        entry.future.set_exception(exc)

    def _evict(self) -> None:
        """Oldest first, until within count and bytes (called with the lock held)."""
        limits = self.limits
        while len(self._cache) > limits.cache_entries or self._cached_bytes > limits.cache_bytes:
            key, old = next(iter(self._cache.items()))
            if not old.future.done() and len(self._cache) <= limits.cache_entries:
                break  # only a running compile is left over the byte bound
            del self._cache[key]
            self._cached_bytes -= old.index_bytes

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            lanes, self._lanes = self._lanes, None
        self._lark.shutdown()
        if lanes is not None:
            for lane in lanes.values():
                lane.shutdown()
