"""One minibatch loop for every cloud training step, data-parallel over the cloud's workers (docs/scale-out.md).

The cloud's workers are processes joined in a `torch.distributed` process group (the runtime starts them; with one
worker there is no group). Every worker holds the same model and data and runs the same step with the same seeded
minibatch order; in each minibatch a worker computes the loss of its own contiguous part, the gradients are summed
across workers, and every worker takes the same optimizer step, so the models stay identical. A part's loss is its
mean scaled by part / minibatch, so the summed gradient is the whole minibatch's mean gradient: the model is the one
worker's up to float sums in another order. With one worker the loop computes exactly what it always did (no
scaling, no communication), so single-worker numbers are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MinibatchLoss:
    """What one worker's part of a minibatch contributes."""

    loss: torch.Tensor  # mean over the part's samples: what backward starts from
    reported: torch.Tensor  # the part of it the step reports per epoch (e.g. without a penalty)
    leaves: Sequence[torch.Tensor] = field(default_factory=tuple)  # tensors besides the parameters whose gradient
    # is summed across workers (e.g. the rows of a lazily updated table that the minibatch touches)


# loss of one worker's part: (the minibatch's positions, this worker's slice of them) -> MinibatchLoss
PartLoss = Callable[[np.ndarray, slice], MinibatchLoss]


def world() -> tuple[int, int]:
    """(this worker's rank, number of cloud workers): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def part_of(n: int, rank: int, workers: int) -> slice:
    """Worker `rank`'s contiguous part of n items: sizes differ by at most one, the first parts the larger."""
    base, extra = divmod(n, workers)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def split_work(
    bounds: Sequence[tuple[int, int]], compute: Callable[[int, int], Sequence[torch.Tensor]], outputs: int
) -> list[torch.Tensor]:
    """Per-sample work over [lo, hi) ranges that cover 0..n-1 in order, split over the workers: each computes
    `compute(lo, hi)` (`outputs` tensors of length hi − lo) for its contiguous share of the ranges, and every worker
    gets all of them, concatenated in order (one all-reduce of zero-filled float32). With one worker: all here."""
    rank, workers = world()
    if workers == 1:
        parts = [compute(lo, hi) for lo, hi in bounds]
        return [torch.cat(column) for column in zip(*parts, strict=True)] if parts else [torch.zeros(0)] * outputs
    flat = torch.zeros(outputs, bounds[-1][1] if bounds else 0)
    for lo, hi in bounds[part_of(len(bounds), rank, workers)]:
        for column, value in enumerate(compute(lo, hi)):
            flat[column, lo:hi] = value
    dist.all_reduce(flat)
    return list(flat)


def minibatch_loop(
    n: int,
    part_loss: PartLoss,
    parameters: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    after_step: Callable[[MinibatchLoss], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    max_samples: int | None = None,
) -> list[float]:
    """`epochs` passes over positions 0..n-1 in minibatches of `batch_size`, each pass in the order
    `rng.permutation(n)`; per minibatch: this worker's part's loss, backward, gradients summed across workers,
    `optimizer.step()`, then `after_step` (e.g. a second optimizer for the `leaves`). Returns the mean reported loss
    per epoch over all workers' samples. `on_batch(done, total)` after every minibatch. `max_samples`: stop once
    about that many samples went through (whole minibatches), within an epoch if need be (its loss is then over the
    minibatches it took)."""
    rank, workers = world()
    max_steps = None if max_samples is None else -(-max_samples // batch_size)
    losses: list[float] = []
    total_batches, done = epochs * -(-n // batch_size), 0
    if max_steps is not None:
        total_batches = min(total_batches, max_steps)
    for _ in range(epochs):
        if max_steps is not None and done >= max_steps:
            break
        order = rng.permutation(n)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            if max_steps is not None and done >= max_steps:
                break
            positions = order[start : start + batch_size]
            part = part_of(len(positions), rank, workers) if workers > 1 else slice(None)
            step = part_loss(positions, part)  # called with an empty part too: the leaves must match across workers
            optimizer.zero_grad(set_to_none=True)
            if workers == 1:
                step.loss.backward()
                total += float(step.reported.detach()) * len(positions)
            else:
                size = part.stop - part.start
                if size:
                    (step.loss * (size / len(positions))).backward()
                reported = step.reported.detach() * size if size else torch.zeros(())
                total += _sum_gradients([*parameters, *step.leaves], reported)
            count += len(positions)
            optimizer.step()
            if after_step is not None:
                after_step(step)
            done += 1
            if on_batch is not None:
                on_batch(done, total_batches)
        losses.append(total / max(count, 1))
    return losses


def _sum_gradients(tensors: Sequence[torch.Tensor], reported: torch.Tensor) -> float:
    """Sum the tensors' gradients and `reported` across workers in one all-reduce; returns the summed `reported`.
    A gradient missing on one worker counts as zero; missing on all it stays missing, as with one worker (Adam
    leaves such a parameter alone instead of moving it by its momentum)."""
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
    present = torch.tensor([float(t.grad is not None) for t in tensors])
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), present, reported.reshape(1).float()])
    dist.all_reduce(flat)
    at = 0
    for tensor, grad, flag in zip(tensors, grads, flat[-1 - len(tensors) : -1], strict=True):
        size = grad.numel()
        tensor.grad = flat[at : at + size].view_as(grad).to(grad.dtype) if flag > 0 else None
        at += size
    return float(flat[-1])
