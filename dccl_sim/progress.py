"""How far a run has got: how a long set-up step reports its counts, and the time left of the rounds."""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""`on_progress(stage, done, total)`: `stage` names the step and the unit it counts, as the progress line shows it
before "done of total" (e.g. "pretraining: minibatch"); called as work finishes, `done` never decreasing."""


class RoundEta:
    """The time left of a run's rounds, from the rounds measured so far: the rounds not yet finished times the mean
    round time, less the time already spent in the current round (at most one mean round: a round running long
    counts as nearly done, not as negative). None until a round has finished: nothing measured says how long one
    takes, and set-up (data, pretraining) says nothing about it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rounds_left = 0
        self.round_times: list[float] = []
        self.round_started = 0.0

    def start(self, rounds_left: int) -> None:
        """The first round (of `rounds_left`) begins now."""
        self.rounds_left, self.round_started = rounds_left, self.clock()

    def round_finished(self) -> None:
        """A round ended now; the next, if any, begins."""
        now = self.clock()
        self.round_times.append(now - self.round_started)
        self.rounds_left, self.round_started = max(0, self.rounds_left - 1), now

    def seconds_left(self) -> float | None:
        if not self.round_times:
            return None
        mean = sum(self.round_times) / len(self.round_times)
        if self.rounds_left == 0:
            return 0.0
        return self.rounds_left * mean - min(self.clock() - self.round_started, mean)
