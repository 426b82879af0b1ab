"""Data parallelism: N engine replicas behind the one interface `AsyncEngine` drives.

Each replica is a whole engine (`LLMEngine` with its scheduler, KV cache and worker process(es)
on the mp executor, so the replicas compute in parallel instead of sharing one interpreter) in
its own `EngineThread`. `ReplicaSet` presents them as one thread: a request goes to the replica
`PrefixAffinityRouter` picks, aborts go to every replica (a no-op where the id is unknown), and
the stats are summed. A replica whose worker dies fails its own requests (EngineDeadError) and
leaves the rotation; the others keep serving, and the engine is dead only when all are.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import fields

from asyncllm.config import EngineArgs
from asyncllm.core.kv_cache_manager import hash_block
from asyncllm.engine.engine_thread import EngineThread
from asyncllm.engine.llm_engine import LLMEngine, PreparedRequest
from asyncllm.engine.request_stream import RequestStream
from asyncllm.engine.stats import EngineSnapshot, StatsCollector
from asyncllm.errors import EngineDeadError, EngineOverloadedError


class PrefixAffinityRouter:
    """Picks a replica for each prompt: the one that last served its longest known prefix (its KV
    blocks are likely still in that replica's prefix cache), unless that replica is busier than the
    least loaded by more than `max_imbalance` sequences; then the least loaded (lowest index on ties).

    Prefixes are the prompt's leading full KV blocks, hashed as the prefix cache hashes them (chained,
    with the salt/adapter key), at most `max_blocks` deep; `capacity` hashes are remembered (LRU)."""

    def __init__(self, block_size: int, max_imbalance: int = 4, max_blocks: int = 32, capacity: int = 1 << 16):
        self.block_size = block_size
        self.max_imbalance = max_imbalance
        self.max_blocks = max_blocks
        self.capacity = capacity
        self._owner: OrderedDict[bytes, int] = OrderedDict()
        self.affinity_hits = 0  # routed to a prefix's replica (for tests and tuning)

    def prefix_hashes(self, token_ids: Sequence[int], extra_key: str | None) -> list[bytes]:
        hashes: list[bytes] = []
        parent = None
        for i in range(min(len(token_ids) // self.block_size, self.max_blocks)):
            parent = hash_block(parent, list(token_ids[i * self.block_size:(i + 1) * self.block_size]), extra_key)
            hashes.append(parent)
        return hashes

    def choose(self, token_ids: Sequence[int], extra_key: str | None, loads: Sequence[int | None]) -> int:
        """`loads[i]` is replica i's queued + running sequences, None where it cannot take work."""
        live = [i for i, load in enumerate(loads) if load is not None]
        if not live:
            raise EngineDeadError("every data-parallel replica is dead")
        least = min(live, key=lambda i: (loads[i], i))
        hashes = self.prefix_hashes(token_ids, extra_key)
        pick = least
        for h in reversed(hashes):  # the longest prefix some replica served
            owner = self._owner.get(h)
            if owner is not None:
                if loads[owner] is not None and loads[owner] - loads[least] <= self.max_imbalance:
                    pick = owner
                    self.affinity_hits += 1
                break
        for h in hashes:
            self._owner[h] = pick
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)
        return pick


class AggregateStats:
    """The replicas' StatsCollectors seen as one: counters summed, KV usage averaged, the prefix-cache
    hit rate over all lookups; latency listeners (Prometheus) attached to every replica."""

    def __init__(self, collectors: list[StatsCollector]):
        self.collectors = collectors

    def add_listener(self, fn) -> None:
        for collector in self.collectors:
            collector.add_listener(fn)

    @property
    def snapshot(self) -> EngineSnapshot:
        snaps = [c.snapshot for c in self.collectors]
        total = EngineSnapshot()
        for f in fields(EngineSnapshot):
            if f.type in ("int", int):
                setattr(total, f.name, sum(getattr(s, f.name) for s in snaps))
        total.kv_usage = sum(s.kv_usage for s in snaps) / len(snaps)
        total.prefix_cache_hit_rate = total.prefix_cache_hits / total.prefix_cache_queries \
            if total.prefix_cache_queries else 0.0
        for s in snaps:
            for reason, count in s.requests_finished.items():
                total.requests_finished[reason] = total.requests_finished.get(reason, 0) + count
        return total


class ReplicaSet:
    """N EngineThreads behind the EngineThread interface AsyncEngine uses (start, submit, abort,
    shutdown, serving, dead_error, stats)."""

    def __init__(self, engines: list[LLMEngine], max_waiting_requests: int):
        self.replicas = [EngineThread(engine, max_waiting_requests) for engine in engines]
        self.router = PrefixAffinityRouter(engines[0].config.args.block_size)
        self.stats = AggregateStats([replica.stats for replica in self.replicas])
        self._lock = threading.Lock()  # routing decisions, one at a time (loads read, then added to)

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()

    @property
    def alive(self) -> list[bool]:
        """Per replica: can it serve?"""
        return [replica.serving for replica in self.replicas]

    @property
    def serving(self) -> bool:
        return any(self.alive)

    @property
    def dead_error(self) -> EngineDeadError | None:
        if self.serving:
            return None
        reasons = "; ".join(f"replica {i}: {r.dead_error or 'its worker died'}" for i, r in enumerate(self.replicas))
        return EngineDeadError(f"every data-parallel replica is dead ({reasons})")

    def submit(self, prepared: PreparedRequest, stream: RequestStream) -> None:
        request = prepared.requests[0]
        with self._lock:
            alive = self.alive
            loads = [replica.load if ok else None for replica, ok in zip(self.replicas, alive)]
            index = self.router.choose(prepared.prompt_token_ids, request.cache_key, loads)
            try:
                self.replicas[index].submit(prepared, stream)
            except (EngineOverloadedError, EngineDeadError):
                # Full or just died: the least loaded other replica that takes it, else the error.
                for other in sorted((i for i in range(len(loads)) if loads[i] is not None and i != index),
                                    key=lambda i: loads[i]):
                    try:
                        self.replicas[other].submit(prepared, stream)
                        return
                    except (EngineOverloadedError, EngineDeadError):
                        continue
                raise

    def abort(self, request_id: str) -> None:
        for replica in self.replicas:
            replica.abort(request_id)

    def shutdown(self, timeout: float | None) -> None:
        """Every replica drains at once (for up to `timeout` s), not one after another."""
        threads = [threading.Thread(target=replica.shutdown, args=(timeout,), name=f"asyncllm-dp-stop-{i}")
                   for i, replica in enumerate(self.replicas)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def load_replicas(args: EngineArgs, overrides: dict) -> list[LLMEngine]:
    """`data_parallel_size` engines loaded at once (each waits on its own worker processes), numbered
    by `data_parallel_rank`; if any fails, the others are shut down and the error raised."""
    base = dataclasses.replace(args)
    base.override(overrides)
    configs = [dataclasses.replace(base, data_parallel_rank=rank).create_engine_config()
               for rank in range(base.data_parallel_size)]
    with concurrent.futures.ThreadPoolExecutor(len(configs), thread_name_prefix="asyncllm-dp-load") as pool:
        futures = [pool.submit(LLMEngine, config) for config in configs]
        concurrent.futures.wait(futures)
    engines = [f.result() for f in futures if f.exception() is None]
    failed = next((f.exception() for f in futures if f.exception() is not None), None)
    if failed is not None:
        for engine in engines:
            engine.shutdown()
        raise failed
    return engines
