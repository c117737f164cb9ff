"""What full-ranking evaluation costs against today's sampled evaluation, on ML-100K (NOTES.md, 2026-12-05).

For each model and torch thread count: the time to rank every test positive of the 943 devices among its 99 sampled
negatives (`predict` on the test split's samples, then `positive_ranks`: what a round's evaluation does) and among
all its candidate items (`FullRanker`: `item_side`, then the ranks), with the metrics of both; then the full ranks of
three models sharing W (plain, and two random per-query meta-patches: a round's broadcast, starting and
personalized models) from one z_0. The models are trained
for `--epochs` epochs on the training split first, so that the metrics mean something; the timings do not depend on
the weights.

    PYTHONPATH=.:experiments python -m bench.full_ranking [--threads 1,2] [--models din,sasrec] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dccl_sim import metrics, plugins
from dccl_sim.algorithms.full_ranking import FullRanker
from dccl_sim.config import DataConfig, ModelConfig
from dccl_sim.data.device_data import SPLIT_TEST, SPLIT_TRAIN, DeviceData
from dccl_sim.data.prepare import build
from dccl_sim.models.base import ModelSpec, Recommender
from dccl_sim.models.metapatch import MetaPatch
from dccl_sim.models.training import fit, predict

KS = (5, 10, 20)


def _best(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(the fastest of `repeats` calls of fn, in seconds; the last call's result)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def measure(model: Recommender, data: DeviceData, history_len: int, repeats: int) -> dict[str, Any]:
    """Sampled and full ranking of every test positive of `data` under `model`: times and metrics."""
    test = np.flatnonzero(data.split == SPLIT_TEST)
    queries = test[data.label[test] == 1]

    def sampled() -> np.ndarray:
        scores = predict(model, data, test, history_len=history_len)
        return metrics.positive_ranks(data.query_ids(test), data.label[test], scores)

    torch.manual_seed(0)
    patch = MetaPatch(model.hidden_sizes, k=16, rank=16)
    thetas = [None, 0.1 * torch.randn(len(queries), 16), 0.1 * torch.randn(len(queries), 16)]

    def full_side() -> FullRanker:
        return FullRanker(model, patch, history_len=history_len)

    sampled_s, sampled_ranks = _best(repeats, sampled)
    side_s, ranker = _best(repeats, full_side)
    ranks_s, full_ranks = _best(repeats, lambda: ranker.ranks(data, queries))
    three_s, _ = _best(repeats, lambda: ranker.ranks_many(data, queries, thetas))
    return {
        "queries": len(queries),
        "sampled_samples": len(test),
        "sampled_s": sampled_s,
        "full_item_side_s": side_s,
        "full_ranks_s": ranks_s,
        "full_s": side_s + ranks_s,
        "full_over_sampled": (side_s + ranks_s) / sampled_s,
        "full_plain_and_two_patched_s": side_s + three_s,
        "sampled": metrics.rank_metrics(sampled_ranks, KS),
        "full": metrics.rank_metrics(full_ranks, KS),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.full_ranking", description=__doc__)
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    parser.add_argument("--models", default="din,sasrec", help="model names, comma-separated")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs before measuring")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per timing; the fastest is reported")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    config = DataConfig()
    built = build(config, 0)
    meta, data = built.meta, built.data
    spec = ModelSpec(meta.num_items, meta.num_categories, tuple(meta.profile_cardinalities), built.item_category)
    train = np.flatnonzero(data.split == SPLIT_TRAIN)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = plugins.resolve(plugins.MODEL, name)(spec, ModelConfig())
        torch.set_num_threads(2)
        fit(
            model,
            data,
            train,
            epochs=args.epochs,
            batch_size=1024,
            lr=3e-3,
            history_len=config.history_len,
            seed_keys=(0,),
        )
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            row = {"model": name, "threads": threads, **measure(model, data, config.history_len, args.repeats)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{meta.num_devices} devices, {meta.num_items} items, {rows[0]['queries']} test positives\n")
    print(
        "| model | threads | sampled s | full s (item side) | full / sampled | 3 models on one W, full s "
        "| HR@10 sampled | HR@10 full |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['threads']} | {r['sampled_s']:.2f} | {r['full_s']:.2f} ({r['full_item_side_s']:.2f}) "
            f"| {r['full_over_sampled']:.2f}× | {r['full_plain_and_two_patched_s']:.2f} "
            f"| {r['sampled']['hr@10']:.4f} | {r['full']['hr@10']:.4f} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
