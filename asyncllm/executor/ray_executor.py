"""RayExecutor (`distributed_executor_backend="ray"`): each rank is a Ray actor, placed in a
placement group of the Ray cluster that `ray.init()` finds (RAY_ADDRESS, `ray start --head` /
`ray start --address=...` on each machine) or starts on this host, so tensor-parallel ranks may
span machines.

The actors run the same `WorkerCalls` as the mp executor's processes (msgpack in, msgpack out) and
join one torch.distributed group at a TCP address on rank 0's node (gloo on the CPU, NCCL on CUDA;
the shared-memory all-reduce too when every rank is on one host). A step is one method call per
rank, awaited together. Deaths: each actor also runs `until_exit()`, which ends only when the actor
does, so a watcher thread learns of a dead actor even while the engine is idle; a step that does not
finish within `execute_model_timeout` stops every actor.
"""
from __future__ import annotations

import os
import socket
import threading
import uuid

from asyncllm.config import EngineConfig
from asyncllm.errors import EngineDeadError
from asyncllm.executor import wire
from asyncllm.executor.abstract import RemoteWorkersExecutor
from asyncllm.executor.multiproc import reply_bodies

PLACEMENT_TIMEOUT_S = 60.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("distributed_executor_backend='ray' needs Ray: pip install 'asyncllm-engine[ray]'") from None
    return ray


class RayWorker:
    """One rank, as a Ray actor (made remote by RayExecutor; Ray imports this module in the actor)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.calls = None
        self._exit = threading.Event()

    def where(self) -> tuple[str, str, int]:
        """(node id, node IP, pid) of this actor."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def join(self, init_method: str, backend: str, shm_dir: str | None, tp_size: int) -> None:
        from asyncllm.executor.worker_process import WorkerCalls, join_group

        group = join_group(self.rank, self.world_size, init_method, backend, shm_dir,
                           tp_size) if self.world_size > 1 else None
        self.calls = WorkerCalls(self.rank, self.world_size, group)

    def call(self, method: bytes, body: bytes) -> bytes:
        return self.calls.handle(method, body)

    def until_exit(self) -> None:
        """Returns at close(); fails (RayActorError) if the actor dies: the executor's death watch."""
        self._exit.wait()

    def close(self) -> None:
        if self.calls is not None:
            self.calls.close()
        self._exit.set()


class RayExecutor(RemoteWorkersExecutor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        ray = self._ray = import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, include_dashboard=False)  # RAY_ADDRESS or a local cluster
        world_size = config.args.world_size
        gpu = config.device.type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self._group = placement_group([bundle] * world_size, strategy="PACK")
        try:
            ray.get(self._group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self._group)
            raise ValueError(f"the Ray cluster could not place {world_size} worker(s) of {bundle} within "
                             f"{PLACEMENT_TIMEOUT_S:g} s (cluster resources: {ray.cluster_resources()})") from None
        actor = ray.remote(RayWorker)
        self.actors = [actor.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_concurrency=2,
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(
                                         placement_group=self._group, placement_group_bundle_index=rank))
                       .remote(rank, world_size) for rank in range(world_size)]
        self._closing = False
        self._lock = threading.Lock()
        try:
            places = ray.get([a.where.remote() for a in self.actors], timeout=PLACEMENT_TIMEOUT_S)
            self.pids = [pid for _, _, pid in places]
            if world_size > 1:
                port = ray.get(self.actors[0].free_port.remote())
                one_host = len({node for node, _, _ in places}) == 1 and os.path.isdir("/dev/shm")
                # The shared-memory all-reduce's file is named after this folder (under /dev/shm).
                shm_dir = f"asyncllm-ray-{uuid.uuid4().hex}" if one_host else None
                init = f"tcp://{places[0][1]}:{port}"
                ray.get([a.join.remote(init, "nccl" if gpu else "gloo", shm_dir, config.args.tensor_parallel_size)
                         for a in self.actors])
            else:
                ray.get(self.actors[0].join.remote("", "gloo", None, 1))
            self._watch_refs = [a.until_exit.remote() for a in self.actors]
            threading.Thread(target=self._watch, name="asyncllm-ray-watch", daemon=True).start()
            self._call(b"config", wire.encode(config.args))
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ calls

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _start(self, method: bytes, payload: bytes):
        """Each actor's call starts now (an actor runs its calls in order); collect(timeout) awaits them."""
        refs = self._submit(method, payload)
        return lambda timeout: self._get(refs, timeout, method)

    def _submit(self, method: bytes, payload: bytes) -> list:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            return [a.call.remote(method, payload) for a in self.actors]

    def _get(self, refs: list, timeout: float | None, method: bytes) -> list[bytes]:
        ray = self._ray
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            try:
                replies = ray.get(refs, timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                self._mark_dead(f"a Ray worker did not finish a step within {timeout:g} s "
                                f"(execute_model_timeout): hung")
                self._kill_all()
                raise EngineDeadError(self._dead) from None
            except ray.exceptions.RayActorError as exc:
                self._mark_dead(f"a Ray worker actor died: {exc}")
                self._kill_all()
                raise EngineDeadError(self._dead) from exc
        return reply_bodies(method, replies)

    # ------------------------------------------------------------------ death and shutdown

    def _watch(self) -> None:
        ray = self._ray
        ready, _ = ray.wait(self._watch_refs, num_returns=1)
        if self._closing:
            return
        try:
            ray.get(ready[0])
            reason = "a Ray worker actor exited"
        except ray.exceptions.RayError as exc:
            reason = f"a Ray worker actor died: {exc}"
        self._mark_dead(reason)
        self._kill_all()  # the others would wait in their next collective for the dead one

    def _kill_all(self) -> None:
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        ray = self._ray
        if self._dead is None:
            try:
                ray.get([a.close.remote() for a in self.actors], timeout=10)
            except Exception:  # noqa: BLE001 - stopped below either way
                pass
        self._kill_all()
        ray.util.remove_placement_group(self._group)
