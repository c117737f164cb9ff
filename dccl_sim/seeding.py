"""Every random draw in a run comes from a generator derived from integer keys, never from process state.

The keys of a draw are (seed, [round,] [ids...,] stream tag): the tags of every named stream live here, in one
place, so two streams never share draws by accident. `RoundContext.keys` / `.rng` build a round's keys.
"""

from __future__ import annotations

import numpy as np

# stream name -> tag. Run-level streams are keyed (seed, tag); round streams (seed, round, tag) or, per device,
# (seed, round, device id, tag). A plug-in adds its own names with new tags (`register_stream`).
STREAMS: dict[str, int] = {
    # run level
    "pretrain_minibatches": 0x9E7,
    "bootstrap_minibatches": 0xB007,
    "eval_devices": 0xE7A1,
    # round level
    "participants": 0x5A3,
    "cloud_minibatches": 0xC1,
    "patch_space_minibatches": 0xE7,
    "coda_candidates": 0xC0DA,
    # per device in a round
    "patch_trial": 0,
    "patch_refit": 1,
    "device_copy": 2,
}


def register_stream(name: str, tag: int) -> None:
    """Name a new stream (a plug-in's); its tag must not be one already in use."""
    if STREAMS.get(name, tag) != tag or (name not in STREAMS and tag in STREAMS.values()):
        raise ValueError(f"random stream {name!r} or tag {tag:#x} is taken")
    STREAMS[name] = tag


def stream_tag(name: str) -> int:
    if name not in STREAMS:
        raise KeyError(f"unknown random stream {name!r}; known: {', '.join(STREAMS)}")
    return STREAMS[name]


def run_keys(seed: int, stream: str) -> tuple[int, int]:
    """Seed keys of a run-level stream (pretraining, bootstrapping, the evaluation sample)."""
    return (seed, stream_tag(stream))


def seeded_generator(*keys: int) -> np.random.Generator:
    """A NumPy generator derived from integer keys such as (seed, round, device id), never from process state."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))
