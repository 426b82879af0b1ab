"""StatsCollector: engine-wide counters and latency samples for metrics (written by the engine thread)."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from asyncllm.outputs import RequestOutput


@dataclass
class EngineSnapshot:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, and those found
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    spec_num_drafts: int = 0  # speculative decoding: verifications, proposed tokens, accepted ones
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # finish reason → count


class StatsCollector:
    """Keeps the latest snapshot plus bounded windows of TTFT / inter-token / end-to-end samples."""

    def __init__(self, window: int = 10_000):
        self._lock = threading.Lock()
        self.snapshot = EngineSnapshot()
        self.ttft = deque(maxlen=window)
        self.itl = deque(maxlen=window)
        self.e2e = deque(maxlen=window)
        self._last_token_time: dict[str, float] = {}
        self._listeners: list = []

    def add_listener(self, fn) -> None:
        """fn(kind, value) for each new sample (kind: ttft | itl | e2e | finished); e.g. Prometheus."""
        self._listeners.append(fn)

    def _emit(self, kind: str, value) -> None:
        for fn in self._listeners:
            fn(kind, value)

    def record_step(self, engine, outputs: list[RequestOutput]) -> None:
        core = engine.core
        st = core.stats()
        with self._lock:
            snap = self.snapshot
            snap.num_running, snap.num_waiting = st.num_running, st.num_waiting
            snap.kv_usage, snap.prefix_cache_hit_rate = st.kv_usage, st.prefix_cache_hit_rate
            snap.prefix_cache_queries, snap.prefix_cache_hits = st.prefix_cache_queries, st.prefix_cache_hits
            snap.prompt_tokens, snap.generation_tokens = st.prompt_tokens_computed, st.generation_tokens
            snap.num_preemptions, snap.num_steps = st.num_preemptions, st.num_steps
            snap.spec_num_drafts, snap.spec_num_draft_tokens = st.spec_num_drafts, st.spec_num_draft_tokens
            snap.spec_num_accepted_tokens = st.spec_num_accepted_tokens
        self.record_outputs(outputs)

    def record_outputs(self, outputs: list[RequestOutput]) -> None:
        """Latency samples and finish counts of delivered outputs (steps and aborts alike)."""
        with self._lock:
            snap = self.snapshot
            for out in outputs:
                m = out.metrics
                if m is None or m.last_token_time is None:
                    continue
                last = self._last_token_time.get(out.request_id)
                if last is None and m.first_token_time is not None:
                    value = m.first_token_time - m.arrival_time
                    self.ttft.append(value)
                    self._emit("ttft", value)
                elif last is not None and m.last_token_time > last:
                    value = m.last_token_time - last
                    self.itl.append(value)
                    self._emit("itl", value)
                self._last_token_time[out.request_id] = m.last_token_time
                if out.finished:
                    self._last_token_time.pop(out.request_id, None)
                    if m.finished_time is not None:
                        self.e2e.append(m.finished_time - m.arrival_time)
                        self._emit("e2e", m.finished_time - m.arrival_time)
                    for c in out.outputs:
                        reason = c.finish_reason or "unknown"
                        snap.requests_finished[reason] = snap.requests_finished.get(reason, 0) + 1
                        self._emit("finished", reason)
