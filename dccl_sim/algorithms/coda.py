"""CoDA (docs/design.md §4, `coda`): cloud-coordinated data augmentation, as plain math over arrays.

Cloud, coarse matching: users are represented by the cloud model's item embeddings of their newest interactions
the cloud holds; each participant's most cosine-similar users (one matrix product per block of participants) supply
at most S candidate samples from the cloud's pool, drawn seeded by (seed, round, device id).

Device, fine filtering and training, packed over K devices: a per-device logistic regression (local = 1 vs
candidate = 0) keeps the candidates it scores local-like; the meta-patch is then trained by the MetaPatch step on
local + kept samples, the kept ones carrying their own loss weight. With K = 1 this is the single-device step: the
packed result equals K single-device calls (a test holds it to 1e-5).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch.nn import functional

from dccl_sim.algorithms.cloud_steps import features_of
from dccl_sim.algorithms.metapatch_step import LocalSamples, metapatch_device_step
from dccl_sim.algorithms.packed_adam import PackedAdam
from dccl_sim.config import DeviceConfig
from dccl_sim.context import RoundContext
from dccl_sim.data.device_data import DeviceData
from dccl_sim.models.base import Recommender
from dccl_sim.models.metapatch import MetaPatch
from dccl_sim.seeding import seeded_generator


class CodaSettings(Protocol):
    """The settings of the `coda` strategy the math reads (the strategy's `Settings` section)."""

    filter: str
    threshold: float | None
    keep_frac: float | None
    weight: float
    classifier_steps: int
    classifier_lr: float
    classifier_l2: float


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


# similarity blocks hold at most this many entries ([block, num_devices] float32: 64 MiB)
BLOCK_ENTRIES = 1 << 24
_STANDARDIZE_EPS = 1e-6

# ---------------------------------------------------------------- cloud: coarse-grained matching


@torch.no_grad()
def user_representations(model: Recommender, data: DeviceData, pool: np.ndarray, history_len: int) -> torch.Tensor:
    """[D, d] unit vectors, one per device row of `data`: the mean item embedding (item + category, the cloud
    model's own table) of the device's newest positive in `pool` and the `history_len` items before it. Devices
    without a positive in the pool get a zero row (similar to nobody)."""
    positives = np.flatnonzero(pool & (data.label == 1))
    device = data.sample_device[positives]
    # samples are sorted by (device, split, position): a device's newest positive is the last of its run
    newest = positives[np.append(device[1:] != device[:-1], True)] if len(positives) else positives
    reps = torch.zeros(data.num_devices, model.item_table().shape[1])
    if len(newest) == 0:
        return reps
    batch = data.batch(newest, history_len)
    items = torch.cat([batch.history, batch.item.unsqueeze(1)], dim=1)
    mask = (items > 0).unsqueeze(2).to(reps.dtype)
    mean = (model.item_table()[items] * mask).sum(1) / mask.sum(1)
    reps[torch.from_numpy(data.rows_of(data.sample_device[newest]))] = functional.normalize(mean, dim=1)
    return reps


def nearest_users(reps: torch.Tensor, query_rows: np.ndarray, count: int) -> np.ndarray:
    """[Q, count] rows of each query's `count` most cosine-similar users, most similar first: never the query
    itself, never a user without a representation; -1 pads where fewer exist. One matrix product per block of
    queries, sized so that a block's similarities stay within BLOCK_ENTRIES."""
    is_user = (reps.abs().sum(dim=1) > 0).numpy()
    users = np.flatnonzero(is_user)
    table = reps[torch.from_numpy(users)].T.contiguous()
    query_rows = np.asarray(query_rows, dtype=np.int64)
    # each query's column among the users, to exclude it from its own neighbours (-1: it has no representation)
    slot = np.where(is_user[query_rows], np.searchsorted(users, query_rows), -1)
    out = np.full((len(query_rows), count), -1, dtype=np.int64)
    width = min(count, len(users))
    block = max(1, BLOCK_ENTRIES // max(len(users), 1))
    for lo in range(0, len(query_rows) if width else 0, block):
        query = torch.from_numpy(query_rows[lo : lo + block])
        similarity = reps[query] @ table
        own = np.flatnonzero(slot[lo : lo + block] >= 0)
        similarity[torch.from_numpy(own), torch.from_numpy(slot[lo : lo + block][own])] = -math.inf
        values, at = torch.topk(similarity, width, dim=1)
        out[lo : lo + len(query), :width] = np.where(values.numpy() > -math.inf, users[at.numpy()], -1)
    return out


def draw_candidates(
    data: DeviceData,
    pool: np.ndarray,
    neighbours: np.ndarray,
    device_ids: np.ndarray,
    count: int,
    seed_keys: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [Q + 1], sample indices): for query q (global id `device_ids[q]`, neighbour rows `neighbours[q]`)
    at most `count` of the neighbours' pool samples, drawn uniformly without replacement from
    `seeded_generator(*seed_keys, device id)` and sorted. The draw depends only on the neighbour set, not on its
    order or on the other queries."""
    pool_indices = np.flatnonzero(pool)
    bounds = np.searchsorted(data.rows_of(data.sample_device[pool_indices]), np.arange(data.num_devices + 1))
    first, size = bounds[:-1], np.diff(bounds)
    drawn, offsets = [], np.zeros(len(device_ids) + 1, dtype=np.int64)
    for q, device_id in enumerate(device_ids):
        users = np.sort(neighbours[q][neighbours[q] >= 0])
        ends = np.cumsum(size[users])
        total = int(ends[-1]) if len(ends) else 0
        rng = seeded_generator(*seed_keys, int(device_id))
        position = np.sort(rng.choice(total, size=min(count, total), replace=False))
        user = np.searchsorted(ends, position, side="right")
        local = position - (ends - size[users])[user]
        drawn.append(pool_indices[first[users][user] + local])
        offsets[q + 1] = offsets[q] + len(position)
    samples = np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)
    return offsets, samples.astype(np.int64)


def candidate_table(
    model: Recommender, data: DeviceData, offsets: np.ndarray, samples: np.ndarray, history_len: int, dtype: str
) -> Augmentation:
    """The broadcast form of drawn candidates: each distinct sample's top-MLP input x under the frozen (broadcast)
    model, in the wire dtype, and its label; participants index the table."""
    unique, rows = np.unique(samples, return_inverse=True)
    x = features_of(model, data, unique, history_len).numpy().astype(dtype)
    return Augmentation(offsets, rows.astype(np.int64).reshape(-1), x, data.label[unique].astype(np.int8))


# ---------------------------------------------------------------- device: fine-grained filtering, then training


@dataclass(frozen=True)
class Candidates:
    """The candidates of K devices, grouped by device: device m owns `counts[m]` consecutive rows."""

    x: torch.Tensor  # [C, input_dim] top-MLP input under the broadcast model
    label: torch.Tensor  # [C]
    counts: np.ndarray  # [K]

    @property
    def device(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.counts)), self.counts)


@dataclass(frozen=True)
class CodaStepResult:
    theta: torch.Tensor  # [K, k] the uploaded meta-patches
    gate_passed: np.ndarray  # [K] bool
    keep: np.ndarray  # [C] bool: the candidates kept
    n_kept: np.ndarray  # [K]
    classifier_passes: np.ndarray  # [K] rows × steps through the sample classifier
    samples_trained: np.ndarray  # [K] samples passed through the meta-patch training (gate trial + refit)
    classifier_s: float  # wall-clock of the filtering, for the whole pack


def _standardized(features: torch.Tensor, device: torch.Tensor, num_devices: int) -> torch.Tensor:
    """Each device's rows centred and scaled per feature over that device's own rows."""
    count = torch.bincount(device, minlength=num_devices).clamp(min=1).to(features.dtype).unsqueeze(1)
    mean = torch.zeros(num_devices, features.shape[1]).index_add(0, device, features) / count
    centred = features - mean[device]
    var = torch.zeros(num_devices, features.shape[1]).index_add(0, device, centred.pow(2)) / count
    return centred / (var[device] + _STANDARDIZE_EPS).sqrt()


def classifier_scores(
    local_phi: torch.Tensor,
    local_counts: np.ndarray,
    candidate_phi: torch.Tensor,
    candidate_counts: np.ndarray,
    config: CodaSettings,
) -> tuple[torch.Tensor, np.ndarray]:
    """(P(local | candidate) [C], trained [K] bool): per device a logistic regression, local = 1 vs candidate = 0,
    each class weighing one half whatever its size (so 0.5 means "cannot tell"), on features standardized over the
    device's rows, with L2; full-batch Adam. Devices without both classes do not train (score NaN)."""
    num_devices = len(local_counts)
    local_device = np.repeat(np.arange(num_devices), local_counts)
    candidate_device = np.repeat(np.arange(num_devices), candidate_counts)
    device = torch.from_numpy(np.concatenate([local_device, candidate_device]))
    phi = _standardized(torch.cat([local_phi, candidate_phi]), device, num_devices)
    target = torch.cat([torch.ones(len(local_device)), torch.zeros(len(candidate_device))])
    half = 0.5 / np.maximum(np.concatenate([local_counts[local_device], candidate_counts[candidate_device]]), 1)
    class_weight = torch.from_numpy(half.astype(np.float32))
    trained = (local_counts > 0) & (candidate_counts > 0)
    active = torch.from_numpy(np.flatnonzero(trained))
    weight = torch.zeros(num_devices, phi.shape[1], requires_grad=True)
    bias = torch.zeros(num_devices, requires_grad=True)
    optimizer = PackedAdam([weight, bias], lr=config.classifier_lr)
    for _ in range(config.classifier_steps if len(active) else 0):
        logits = (phi * weight[device]).sum(dim=1) + bias[device]
        bce = functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = (class_weight * bce).sum() + config.classifier_l2 * weight[active].pow(2).sum()
        weight.grad, bias.grad = None, None
        loss.backward()
        optimizer.step(active)
    with torch.no_grad():
        rows = slice(len(local_device), None)
        scores = torch.sigmoid((phi[rows] * weight[device[rows]]).sum(dim=1) + bias[device[rows]])
    return torch.where(torch.from_numpy(trained[candidate_device]), scores, math.nan), trained


def select_candidates(scores: torch.Tensor, counts: np.ndarray, config: CodaSettings) -> np.ndarray:
    """[C] bool: the candidates each device keeps. `filter = none`: all; a threshold τ: score ≥ τ; a top fraction ρ:
    the ⌈ρ · n⌉ best-scored of each device's n. A candidate without a score (NaN: its device's classifier did not
    train) is never kept by the classifier."""
    if config.filter == "none":
        return np.ones(int(counts.sum()), dtype=bool)
    values = scores.numpy()
    if config.threshold is not None:
        return values >= config.threshold
    device = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((-values, device))  # by device, best first; ties keep the candidates' order
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    return (rank < np.ceil(config.keep_frac * counts)[device]) & ~np.isnan(values)


def augmented_samples(
    local: LocalSamples, kept_z0: torch.Tensor, candidates: Candidates, keep: np.ndarray, weight: float
) -> LocalSamples:
    """Each device's kept candidates (z_0 in `kept_z0`, in candidate order; loss weight `weight`) followed by its
    own samples (weight 1). The newest local slice stays last, so the gate trains on augmented + older local data
    and checks on the device's own newest."""
    num_devices = local.num_devices
    local_counts = local.ends - local.starts
    local_rows = np.concatenate([np.arange(a, b) for a, b in zip(local.starts, local.ends, strict=True)])
    kept = np.flatnonzero(keep)
    kept_counts = np.bincount(candidates.device[kept], minlength=num_devices)
    device = np.concatenate([candidates.device[kept], np.repeat(np.arange(num_devices), local_counts)])
    part = np.concatenate([np.zeros(len(kept), dtype=np.int64), np.ones(len(local_rows), dtype=np.int64)])
    order = torch.from_numpy(np.lexsort((part, device)))
    z0 = torch.cat([kept_z0, local.z0[local_rows]])[order]
    label = torch.cat([candidates.label[kept], local.label[local_rows]])[order]
    row_weight = torch.cat([torch.full((len(kept),), float(weight)), torch.ones(len(local_rows))])[order]
    ends = np.cumsum(kept_counts + local_counts).astype(np.int64)
    starts = ends - kept_counts - local_counts
    holdout_start = starts + kept_counts + (local.holdout_start - local.starts)
    return replace(local, z0=z0, label=label, starts=starts, ends=ends, holdout_start=holdout_start, weight=row_weight)


def coda_device_step(
    model: Recommender,
    patch: MetaPatch,
    local: LocalSamples,
    local_x: torch.Tensor,
    candidates: Candidates,
    theta_start: torch.Tensor,
    device_config: DeviceConfig,
    config: CodaSettings,
    classifier_dims: int,
    ctx: RoundContext,
) -> CodaStepResult:
    """Filter each device's candidates (the classifier reads the first `classifier_dims` features of x), then run the
    MetaPatch step (eq. 3, gated as configured) on local + kept samples."""
    tic = time.perf_counter()
    local_counts = local.ends - local.starts
    passes = np.zeros(len(local_counts), dtype=np.int64)
    scores = torch.full((len(candidates.label),), math.nan)
    if config.filter == "classifier":
        scores, trained = classifier_scores(
            local_x[:, :classifier_dims], local_counts, candidates.x[:, :classifier_dims], candidates.counts, config
        )
        passes = np.where(trained, (local_counts + candidates.counts) * config.classifier_steps, 0)
    keep = select_candidates(scores, candidates.counts, config)
    classifier_s = time.perf_counter() - tic
    with torch.no_grad():
        kept_z0 = model.first_hidden(candidates.x[torch.from_numpy(np.flatnonzero(keep))])
    samples = augmented_samples(local, kept_z0, candidates, keep, config.weight)
    step = metapatch_device_step(model, patch, samples, theta_start, device_config, ctx)
    trial = samples.holdout_start - samples.starts if device_config.gate else np.zeros(len(local_counts))
    refit = np.where(step.gate_passed, samples.ends - samples.starts, 0)
    trained = ((trial + refit) * device_config.local_epochs).astype(np.int64)
    return CodaStepResult(
        theta=step.theta,
        gate_passed=step.gate_passed,
        keep=keep,
        n_kept=np.bincount(candidates.device[keep], minlength=len(local_counts)).astype(np.int64),
        classifier_passes=passes.astype(np.int64),
        samples_trained=trained,
        classifier_s=classifier_s,
    )
