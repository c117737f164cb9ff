"""What moves between the cloud and the devices in a round: plain values, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# Per-device result columns every strategy fills (one entry per device of a pack).
DEVICE_COLUMNS = (
    "device_id",
    "n_train",
    "n_test",
    "start_auc",
    "device_auc",
    "start_hr",
    "device_hr",
    "start_ndcg",
    "device_ndcg",
    "n_queries",
    "gate_passed",
    "samples_trained",
    "compute_s",
    # CoDA's overheads (0 for the other strategies): candidates received, candidates kept after filtering, rows
    # passed through the sample classifier (steps × rows) and the classifier's share of compute_s
    "n_candidates",
    "n_kept",
    "classifier_passes",
    "classifier_s",
)


@dataclass(frozen=True)
class Augmentation:
    """CoDA's retrieved candidates for every participant, in one broadcast.

    Participant i's candidates are `rows[offsets[i]:offsets[i + 1]]` of a table of distinct samples: their top-MLP
    input x under the broadcast W_t (`features`, in the configured wire dtype) and labels. Devices whose neighbours
    overlap share table rows, so the object store holds each sample once; a real device downloads its own rows.
    """

    offsets: np.ndarray  # [P + 1] int64
    rows: np.ndarray  # [C] int64 into the table
    features: np.ndarray  # [U, input_dim] float16 or float32
    label: np.ndarray  # [U] int8

    def of(self, participants: np.ndarray, device_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(x [C, input_dim] float32, label [C] float32, per-device counts [K]) of the given participants' candidates,
        grouped by device in the order of `device_ids`."""
        at = np.searchsorted(participants, device_ids)
        lo, hi = self.offsets[at], self.offsets[at + 1]
        rows = np.concatenate([self.rows[a:b] for a, b in zip(lo, hi, strict=True)]) if len(at) else self.rows[:0]
        x = torch.from_numpy(self.features[rows].astype(np.float32))
        return x, torch.from_numpy(self.label[rows].astype(np.float32)), (hi - lo).astype(np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.offsets, self.rows, self.features, self.label))


@dataclass(frozen=True)
class Broadcast:
    """Sent once per round through the object store: W_t, G_t, the participants' starting meta-patches and (CoDA)
    their retrieved candidates."""

    round: int
    participants: np.ndarray  # sorted global device ids
    model_state: dict[str, np.ndarray]
    patch_state: dict[str, np.ndarray] | None = None
    start_theta: np.ndarray | None = None  # [len(participants), k]
    augment: Augmentation | None = None  # CoDA's candidates

    def start_theta_of(self, device_ids: np.ndarray, k: int) -> torch.Tensor:
        if self.start_theta is None:
            return torch.zeros(len(device_ids), k)
        rows = np.searchsorted(self.participants, device_ids)
        return torch.from_numpy(self.start_theta[rows].copy())

    @property
    def nbytes(self) -> int:
        states = [self.model_state, self.patch_state or {}]
        extra = self.augment.nbytes if self.augment is not None else 0
        return sum(a.nbytes for state in states for a in state.values()) + extra


@dataclass(frozen=True)
class PackResult:
    """What the devices of one pack upload: per-device columns, meta-patches, and for FedAvg the sample-weighted
    sum of their models (summed inside the pack so the upload does not grow with the pack)."""

    columns: dict[str, np.ndarray]
    theta: np.ndarray | None = None  # [K, k]
    model_sum: dict[str, np.ndarray] | None = None
    weight: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def device_ids(self) -> np.ndarray:
        return self.columns["device_id"]


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().copy() for name, tensor in module.state_dict().items()}


def load_numpy_state(module: nn.Module, state: dict[str, np.ndarray]) -> None:
    module.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state.items()})


def merge_packs(parts: list[PackResult]) -> PackResult:
    """One result for the devices of several packs (or chunks of one), in the order given: columns and
    meta-patches concatenated, FedAvg's model sums and weights added."""
    if len(parts) == 1:
        return parts[0]
    sums = [p.model_sum for p in parts if p.model_sum]
    return PackResult(
        columns={name: np.concatenate([p.columns[name] for p in parts]) for name in parts[0].columns},
        theta=None if parts[0].theta is None else np.concatenate([p.theta for p in parts]),
        model_sum={name: sum(s[name] for s in sums) for name in sums[0]} if sums else None,
        weight=sum(p.weight for p in parts),
    )


def concat_results(results: list[PackResult]) -> dict[str, np.ndarray]:
    """All packs' per-device columns, sorted by device id."""
    if not results:
        return {name: np.zeros(0) for name in DEVICE_COLUMNS}
    columns = {name: np.concatenate([r.columns[name] for r in results]) for name in DEVICE_COLUMNS}
    order = np.argsort(columns["device_id"], kind="stable")
    return {name: values[order] for name, values in columns.items()}


def concat_theta(results: list[PackResult]) -> tuple[np.ndarray, np.ndarray]:
    """(device ids, meta-patches) of all packs, sorted by device id."""
    ids = np.concatenate([r.device_ids for r in results]) if results else np.zeros(0, dtype=np.int64)
    theta = np.concatenate([r.theta for r in results]) if results else np.zeros((0, 0), dtype=np.float32)
    order = np.argsort(ids, kind="stable")
    return ids[order], theta[order]
