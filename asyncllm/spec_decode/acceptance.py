"""AcceptanceGate: stops a request's proposals while they keep being rejected.

A verified token that the target rejects costs a row of compute in a step that did not need it;
on free text, where prompt lookup rarely guesses right, that is most proposals. Each request
keeps a moving average of the share of its proposed tokens that were kept (each new draft weighs
half). Below `floor` it proposes nothing for `PAUSE_STEPS` decode steps, doubling up to
`MAX_PAUSE_STEPS` while it stays poor; each pause ends with one probe draft, and a kept probe
brings the request back to proposing every step.
"""
from __future__ import annotations

from dataclasses import dataclass

PAUSE_STEPS = 4
MAX_PAUSE_STEPS = 64


@dataclass
class AcceptanceGate:
    floor: float  # least acceptance rate worth proposing for
    rate: float = 1.0  # moving average of kept / proposed, new drafts weighing half
    pause: int = 0  # decode steps left without proposals
    next_pause: int = PAUSE_STEPS

    def allows(self) -> bool:
        """Whether this step may carry proposals (a paused step counts down the pause)."""
        if self.pause > 0:
            self.pause -= 1
            return False
        return True

    def record(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        self.rate = 0.5 * self.rate + 0.5 * accepted / proposed
        if self.rate < self.floor:
            self.pause, self.next_pause = self.next_pause, min(2 * self.next_pause, MAX_PAUSE_STEPS)
            self.rate = self.floor  # the probe after the pause decides: kept, the request goes on
        else:
            self.next_pause = PAUSE_STEPS
