"""Prometheus metrics of one app, in its own registry (no module-level globals)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class _EngineCollector:
    """Gauges and counters read from the engine's latest snapshot at scrape time."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def collect(self):
        snap = self.engine.stats()
        names = list(self.labels)
        values = list(self.labels.values())
        for name, doc, value in [
            ("asyncllm_num_requests_running", "Requests being computed", snap.num_running),
            ("asyncllm_num_requests_waiting", "Requests waiting to be scheduled", snap.num_waiting),
            ("asyncllm_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", snap.kv_usage),
            ("asyncllm_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache", snap.prefix_cache_hit_rate),
            ("asyncllm_engine_healthy", "1 while the engine can serve", 1.0 if self.engine.is_healthy else 0.0),
            ("asyncllm_engine_replicas_serving", "Data-parallel replicas that can serve (1 without data "
             "parallelism)", sum(self.engine.replicas_serving)),
            ("asyncllm_spec_decode_mean_acceptance_length", "Speculative decoding: tokens per verification "
             "(1 + accepted proposals per draft)", 1 + snap.spec_num_accepted_tokens / max(1, snap.spec_num_drafts)),
        ]:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            yield g
        for name, doc, value in [
            ("asyncllm_prompt_tokens", "Prompt tokens computed", snap.prompt_tokens),
            ("asyncllm_generation_tokens", "Tokens generated", snap.generation_tokens),
            ("asyncllm_num_preemptions", "Requests preempted for lack of KV blocks", snap.num_preemptions),
            ("asyncllm_spec_decode_num_drafts", "Speculative decoding: verifications of proposed tokens",
             snap.spec_num_drafts),
            ("asyncllm_spec_decode_num_draft_tokens", "Speculative decoding: tokens proposed", snap.spec_num_draft_tokens),
            ("asyncllm_spec_decode_num_accepted_tokens", "Speculative decoding: proposed tokens accepted",
             snap.spec_num_accepted_tokens),
        ]:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            yield c


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.requests = Counter("asyncllm_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("asyncllm_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("asyncllm_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("asyncllm_e2e_request_latency_seconds", "Arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("asyncllm_request_finished", "Finished sequences by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(engine, model_name))
        engine.stats_collector.add_listener(self._on_sample)

    def _on_sample(self, kind: str, value) -> None:
        if kind == "ttft":
            self.ttft.observe(value)
        elif kind == "itl":
            self.itl.observe(value)
        elif kind == "e2e":
            self.e2e.observe(value)
        elif kind == "finished":
            self.finished.labels(finish_reason=value).inc()

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
