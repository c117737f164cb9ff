"""How a long set-up step (data generation, pretraining, ...) tells the run how far it has got."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""`on_progress(stage, done, total)`: `stage` names the step and the unit it counts, as the progress line shows it
before "done of total" (e.g. "pretraining: minibatch"); called as work finishes, `done` never decreasing."""
