"""The shared-memory collectives of tensor parallelism on one host: two ranks (threads here, mapping
the same file as two processes do) get the same all-reduce and all-gather as a plain sum and
concatenation, in rank order, over many alternating rounds."""
import threading

import pytest
import torch

from asyncllm.model.shm_collectives import ShmCollectives, shm_supported

pytestmark = pytest.mark.skipif(not shm_supported(), reason="the flag protocol relies on x86-64 store order")


def test_two_ranks_reduce_and_gather_like_a_sum_and_a_concatenation(tmp_path):
    path = str(tmp_path / "shm")
    ranks = [ShmCollectives(path, 0, 2, slot_bytes=1 << 16, create=True)]
    ranks.append(ShmCollectives(path, 1, 2, slot_bytes=1 << 16))
    inputs = [[torch.randn(3, 40, generator=torch.Generator().manual_seed(100 * r + i)) for i in range(50)]
              for r in range(2)]
    results: dict[int, list] = {0: [], 1: []}

    def run(rank: int) -> None:
        shm = ranks[rank]
        for i, x in enumerate(inputs[rank]):
            if i % 3 == 2:
                results[rank].append(shm.all_gather_last(x.clone()))
            else:
                results[rank].append(shm.all_reduce(x.clone()))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for i in range(50):
        a, b = inputs[0][i], inputs[1][i]
        want = torch.cat([a, b], dim=-1) if i % 3 == 2 else a + b
        assert torch.equal(results[0][i], want) and torch.equal(results[1][i], want)
    assert ranks[0].takes(torch.zeros(1 << 14)) and not ranks[0].takes(torch.zeros((1 << 14) + 1))
    for shm in ranks:
        shm.close()
