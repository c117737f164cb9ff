"""What moves between the cloud and the devices in a round: plain values, no behaviour.

A strategy decides what its broadcast `payload` and its packs' `uploads` and `sums` hold; the runtime only moves
them. A pack's `columns` hold the per-device result columns every strategy fills (`DEVICE_COLUMNS`) plus the
strategy's own (`Strategy.device_columns`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

# Per-device result columns every strategy fills (one entry per device of a pack), besides the start and device
# models' ranking metrics (`start_hr@10`, ..., `device_mrr`: `result_columns`).
DEVICE_COLUMNS = (
    "device_id",
    "n_train",
    "n_test",
    "start_auc",
    "device_auc",
    "n_queries",
    "gate_passed",
    "samples_trained",
    "compute_s",
)


def result_columns(ranking_names: list[str]) -> tuple[str, ...]:
    """Every per-device result column of a run whose ranking metrics are `ranking_names`."""
    return (*DEVICE_COLUMNS, *(f"{model}_{name}" for model in ("start", "device") for name in ranking_names))


@dataclass(frozen=True)
class Broadcast:
    """Sent once per round through the object store: W_t, G_t where the strategy uses patches, and the strategy's
    own `payload` (e.g. the participants' starting meta-patches, or retrieved samples)."""

    round: int
    participants: np.ndarray  # sorted global device ids
    model_state: dict[str, np.ndarray]
    patch_state: dict[str, np.ndarray] | None = None
    payload: Any = None

    @property
    def nbytes(self) -> int:
        states = [self.model_state, self.patch_state or {}]
        extra = getattr(self.payload, "nbytes", 0) if self.payload is not None else 0
        return sum(a.nbytes for state in states for a in state.values()) + extra


@dataclass(frozen=True)
class PackResult:
    """What the devices of one pack upload: per-device `columns`, per-device `uploads` (row m belongs to
    `columns["device_id"][m]`, e.g. meta-patches), and `sums` added over the pack with their total `weight`
    (FedAvg's sample-weighted models: summed inside the pack so the upload does not grow with the pack)."""

    columns: dict[str, np.ndarray]
    uploads: dict[str, np.ndarray] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weight: float = 0.0

    @property
    def device_ids(self) -> np.ndarray:
        return self.columns["device_id"]


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().copy() for name, tensor in module.state_dict().items()}


def load_numpy_state(module: nn.Module, state: dict[str, np.ndarray]) -> None:
    module.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state.items()})


def merge_packs(parts: list[PackResult]) -> PackResult:
    """One result for the devices of several packs (or chunks of one), in the order given: columns and uploads
    concatenated, sums and weights added."""
    if len(parts) == 1:
        return parts[0]
    with_sums = [p.sums for p in parts if p.sums]
    return PackResult(
        columns={name: np.concatenate([p.columns[name] for p in parts]) for name in parts[0].columns},
        uploads={name: np.concatenate([p.uploads[name] for p in parts]) for name in parts[0].uploads},
        sums={name: sum(s[name] for s in with_sums) for name in with_sums[0]} if with_sums else {},
        weight=sum(p.weight for p in parts),
    )


def concat_columns(results: list[PackResult], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The given per-device columns of all packs, sorted by device id."""
    if not results:
        return {name: np.zeros(0) for name in names}
    columns = {name: np.concatenate([r.columns[name] for r in results]) for name in names}
    order = np.argsort(columns["device_id"], kind="stable")
    return {name: values[order] for name, values in columns.items()}


def concat_uploads(results: list[PackResult], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(device ids, their upload `name`) over all packs, sorted by device id."""
    ids = np.concatenate([r.device_ids for r in results]) if results else np.zeros(0, dtype=np.int64)
    rows = np.concatenate([r.uploads[name] for r in results]) if results else np.zeros((0, 0), dtype=np.float32)
    order = np.argsort(ids, kind="stable")
    return ids[order], rows[order]


def received_devices(results: list[PackResult]) -> np.ndarray:
    """The sorted ids of every device that returned a result."""
    return np.sort(np.concatenate([r.device_ids for r in results])) if results else np.zeros(0, dtype=np.int64)
