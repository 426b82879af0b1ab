"""distributed_executor_backend="ray": the ranks as Ray actors in a placement group of a local Ray
cluster of 2 CPUs (started here, stopped at the end); tensor and pipeline parallel over two actors
equal transformers as the mp executor does; a dead actor fails the engine, even when it is idle."""
import os
import signal
import time

import pytest
import ray  # installed by `make test` (the ray extra)

import helpers
from asyncllm import LLM, EngineDeadError, SamplingParams
from server_helpers import pid_alive

pytestmark = pytest.mark.timeout(300)

ARGS = dict(dtype="float32", kv_cache_memory=16 << 20, distributed_executor_backend="ray")


def _cpus_free_within(seconds: float) -> float:
    """The cluster's free CPUs once they are all free again (Ray's view updates asynchronously)."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - e.g. no shared memory for its object store
        pytest.skip(f"a local Ray cluster cannot start on this machine: {exc}")
    yield
    ray.shutdown()


@pytest.mark.parametrize("split", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_two_ray_actors_run_tensor_or_pipeline_parallel_and_match_transformers(split, ray_cluster, tiny_models):
    path = tiny_models("Qwen3ForCausalLM")
    llm = LLM(path, max_num_batched_tokens=20, **{split: 2}, **ARGS)
    executor = llm.engine.core.executor
    try:
        assert type(executor).__name__ == "RayExecutor" and len(executor.actors) == 2
        assert len(set(executor.pids)) == 2 and os.getpid() not in executor.pids
        assert all(pid_alive(pid) for pid in executor.pids)
        helpers.check_mixed_steps_match_transformers(llm, helpers.load_hf(path))
    finally:
        llm.engine.shutdown()
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in executor.pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(pid) for pid in executor.pids)
    # Its placement group is given back: the cluster's 2 CPUs are free for the next engine.
    assert _cpus_free_within(10) == 2


def test_a_dead_ray_actor_fails_the_idle_engine(ray_cluster, tiny_models):
    llm = LLM(tiny_models("LlamaForCausalLM"), tensor_parallel_size=2, **ARGS)
    executor = llm.engine.core.executor
    deaths = []
    executor.on_death(deaths.append)
    try:
        first = llm.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        assert first[0].outputs[0].token_ids
        os.kill(executor.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not deaths and time.monotonic() < deadline:
            time.sleep(0.05)
        assert deaths and "Ray worker actor died" in deaths[0]  # learnt while idle
        with pytest.raises(EngineDeadError, match="Ray worker"):
            llm.generate(["Hello"], SamplingParams(max_tokens=3), use_tqdm=False)
    finally:
        llm.engine.shutdown()
    deadline = time.monotonic() + 10
    while pid_alive(executor.pids[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(executor.pids[0])  # the other rank was stopped too


def test_more_ranks_than_the_cluster_holds_is_refused_with_a_message(ray_cluster, tiny_models, monkeypatch):
    monkeypatch.setattr("asyncllm.executor.ray_executor.PLACEMENT_TIMEOUT_S", 2.0)
    with pytest.raises(ValueError, match="could not place 4 worker"):
        LLM(tiny_models("LlamaForCausalLM"), tensor_parallel_size=4, **ARGS)
    assert _cpus_free_within(10) == 2
