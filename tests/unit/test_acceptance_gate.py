"""AcceptanceGate: a request whose proposals keep being rejected pauses, probes, and resumes."""
from asyncllm.spec_decode.acceptance import MAX_PAUSE_STEPS, PAUSE_STEPS, AcceptanceGate


def _paused_steps(gate: AcceptanceGate) -> int:
    steps = 0
    while not gate.allows():
        steps += 1
    return steps


def test_rejections_pause_with_doubling_probes_and_a_kept_probe_resumes():
    gate = AcceptanceGate(floor=0.1)
    for _ in range(3):  # the average halves each time: 0.5, 0.25, 0.125, still proposing
        assert gate.allows()
        gate.record(4, 0)
    assert gate.allows()
    gate.record(4, 0)  # 0.0625 < 0.1
    assert _paused_steps(gate) == PAUSE_STEPS
    gate.record(4, 0)  # the probe after the pause is rejected too: a longer pause
    assert _paused_steps(gate) == 2 * PAUSE_STEPS
    for _ in range(10):
        gate.record(4, 0)
        assert _paused_steps(gate) <= MAX_PAUSE_STEPS
    gate.record(4, 3)  # a kept probe: proposing every step again, and the next pause starts short
    assert gate.allows() and gate.allows()
    while gate.pause == 0:
        gate.record(4, 0)
    assert _paused_steps(gate) == PAUSE_STEPS


def test_partly_kept_drafts_never_pause_and_steps_without_drafts_count_nothing():
    gate = AcceptanceGate(floor=0.1)
    for _ in range(100):
        gate.record(4, 1)  # a quarter kept: above the floor
        gate.record(0, 0)
        assert gate.allows()
