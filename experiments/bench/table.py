"""`README_table.md`: the benchmark's headline figures as markdown, from the result files of one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PARTS = ("ceiling", "device_phase", "scaling", "broadcast", "flower", "cloud_workers")
PLACEMENTS = {
    "packed_in_process": "packed, in-process, 1 thread (pure compute)",
    "packed_ray": "packed, Ray, default placement",
    "actor_per_device_ray": "one actor per device, Ray",
    "packed_training": "packed, in-process, training step only",
    "loop": "per-device loop, training step only",
}


def read_results(out: Path) -> dict[str, dict[str, Any]]:
    return {part: json.loads((out / f"{part}.json").read_text()) for part in PARTS if (out / f"{part}.json").is_file()}


def write_table(out: Path) -> Path:
    path = out / "README_table.md"
    path.write_text(render(read_results(out)))
    return path


def _num(value: float | None, digits: int = 3) -> str:
    """A figure to `digits` significant digits, thousands separated; a dash where there is none."""
    if value is None:
        return "—"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _giga(value: float | None) -> str:
    return "—" if value is None else _num(value / 1e9)


def render(results: dict[str, dict[str, Any]]) -> str:
    if not results:
        return "No benchmark results yet: run `make bench`.\n"
    first = next(iter(results.values()))
    lines = ["<!-- written by `make bench` (experiments/bench/table.py) from the JSON files beside it -->", ""]
    if first["quick"]:
        lines += ["**Quick run** (`--quick`): tiny sizes, not the benchmark's figures.", ""]
    m, v = first["machine"], first["versions"]
    loads = [f"{p['load_average_start'][0]:.2f}→{p['load_average_end'][0]:.2f}" for p in results.values()]
    runs = {(p["repeats"], p["versions"]["dccl_sim_commit"]) for p in results.values()}
    if len(runs) == 1:  # one run (or runs alike): say it once
        provenance = f"commit {v['dccl_sim_commit']}. Every figure is the median of {first['repeats']} repeats"
    else:  # parts re-run with --parts: each its own
        provenance = "each part's commit and repeats (every figure the median): " + ", ".join(
            f"{part} {p['versions']['dccl_sim_commit']} × {p['repeats']}" for part, p in results.items()
        )
    lines += [
        f"{m['cpu']}, {m['logical_cores']} cores, {m['ram_gib']:.1f} GiB RAM; torch {v['torch']}, ray {v['ray']}, "
        f"{provenance}. Load average (1 min) at the start → end of each part: {', '.join(loads)}.",
        "",
    ]
    for part, render_part in (
        ("ceiling", _ceiling),
        ("device_phase", _device_phase),
        ("scaling", _scaling),
        ("broadcast", _broadcast),
        ("flower", _flower),
        ("cloud_workers", _cloud_workers),
    ):
        if part in results:
            lines += [*render_part(results[part]["results"]), ""]
    return "\n".join(lines)


def _ceiling(r: dict[str, Any]) -> list[str]:
    return [
        f"**Hardware ceiling** (dense float32 `torch.mm`, best of sizes "
        f"{', '.join(str(n) for n in sorted({row['n'] for row in r['measurements']}))}): "
        f"{_giga(r['ceiling_flops_one_thread'])} GFLOP/s on 1 thread, "
        f"{_giga(r['ceiling_flops_all_threads'])} GFLOP/s on {r['all_threads']} threads."
    ]


def _device_phase(r: dict[str, Any]) -> list[str]:
    points = r["points"]
    local = sum(p["local_samples_per_device"] for p in points) / len(points)
    lines = [
        f"**Device phase** (one `dccl` round's device step; default model sizes, 1 local epoch, "
        f"{local:.1f} training samples per device on average; FLOPs counted with FlopCounterMode; "
        "overhead = (wall − packed in-process wall) / devices, for the loop against the packed training step; "
        "in brackets the Ray runtime's own overhead = (wall − slowest actor's compute) / devices; "
        "in-process and loop against the 1-thread ceiling, Ray against all threads):",
        "",
        "| devices | placement | wall s | device-samples trained / s | overhead ms / device | GFLOP/s | % of ceiling |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        for name, label in PLACEMENTS.items():
            variant = p["variants"].get(name)
            if variant is None:
                continue
            if "skipped" in variant:
                lines.append(f"| {p['devices']:,} | {label} | {variant['skipped']} | | | | |")
                continue
            reference = name in ("packed_in_process", "packed_training")
            overhead = "—" if reference else _num(variant["overhead_ms_per_device"])
            if "runtime_overhead_ms_per_device" in variant:
                overhead += f" ({_num(variant['runtime_overhead_ms_per_device'])})"
            if name.endswith("_ray"):
                label += f", {variant['actors']} actors"
            lines.append(
                f"| {p['devices']:,} | {label} | {_num(variant['wall_s'])} | {_num(variant['samples_per_s'])} | "
                f"{overhead} | {_giga(variant['flops_per_s'])} | {_percent(variant['fraction_of_ceiling'])} |"
            )
    lines += [
        "",
        "Packed in-process, by phase: GFLOP/s (% of the 1-thread ceiling):",
        "",
        "| devices | features (z_0) | training | evaluation and the rest | packed vs loop (training) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        phases = p["variants"]["packed_in_process"]["phases"]
        cells = [
            f"{_giga(phases[name]['flops_per_s'])} ({_percent(phases[name]['fraction_of_ceiling'])})"
            for name in ("features", "training", "evaluation_and_rest")
        ]
        speedup = p["variants"]["loop"]["speedup_of_packed"]
        lines.append(f"| {p['devices']:,} | {' | '.join(cells)} | {speedup:.1f}× |")
    return lines


def _scaling(r: dict[str, Any]) -> list[str]:
    lines = [
        "**Round latency and peak memory against devices** (one `dccl` round per point in a fresh process; peak "
        "memory = PSS of the process and everything it started, during the round and over the whole run):",
        "",
        "| devices | set-up s | round s | device phase s | cloud update s | evaluation s | peak memory, round MiB | "
        "peak memory, run MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in r["points"]:
        setup = p.get("setup_s")  # time to the first round; absent from results made before it was recorded
        lines.append(
            f"| {p['n_devices']:,} | {_num(setup)} | "
            f"{_num(p['mean_t_round_s'])} | {_num(p['mean_t_devices_s'])} | "
            f"{_num(p['mean_t_distill_s'])} | {_num(p['mean_t_eval_s'])} | {_num(p['max_round_memory_mb'])} | "
            f"{_num(p['peak_memory_mb'])} |"
        )
    for entry in r["not_measured"]:
        # the first line only: an out-of-memory error carries Ray's whole report (scaling.json keeps it)
        lines.append(f"| {entry['n_devices']:,} | {entry['reason'].splitlines()[0]} | | | | | | |")
    exponents = r["exponents"]
    if exponents:
        over = ", ".join(f"{n:,}" for n in r["fit_devices"])
        lines += [
            "",
            f"Scaling exponent a of time ∝ N^a (least squares on log-log over N = {over}): round "
            f"{exponents['t_round_s']:.2f}, device phase {exponents['t_devices_s']:.2f}; round peak memory "
            f"{exponents['memory']:.2f}.",
        ]
    return lines


def _broadcast(r: dict[str, Any]) -> list[str]:
    lines = [
        f"**Broadcast** ({r['strategy']}, {r['devices']:,} devices): {r['model_and_patch_bytes']:,} bytes of model "
        "and patch generator, plus each participant's id and starting meta-patch; build = the cloud making it, "
        "deliver = every actor holding and reading it, empty call = the same calls without it:",
        "",
        "| actors | bytes per actor | build ms | deliver ms | empty call ms | deliver − empty ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["measurements"]:
        lines.append(
            f"| {row['actors']} | {row['bytes_per_actor']:,} | {_num(1000 * row['build_s'])} | "
            f"{_num(1000 * row['deliver_s'])} | {_num(1000 * row['empty_call_s'])} | {_num(1000 * row['receive_s'])} |"
        )
    return lines


FLOWER_REFERENCES = {
    "packed_in_process": "packed, in-process, 1 thread",
    "packed_ray": "packed, Ray, default placement",
}


def _flower(r: dict[str, Any]) -> list[str]:
    if r["status"] != "measured":
        return [f"**Flower** side by side: {r['status']}: {r['reason']}."]
    env, cpus = r["environment"], r["client_resources"]["num_cpus"]
    lines = [
        f"**Flower side by side** (flwr {r['flwr_version']} `run_simulation`, in its own environment with ray "
        f"{env['ray']}; every device runs one round's device step: load the round-0 broadcast, z_0 of its local "
        "samples, `metapatch_device_step`; Flower: a ClientApp per device, Flower's default backend config but "
        f"`client_resources.num_cpus = {cpus:g}` (Flower's default is 2); startup excluded = Flower's second "
        "round, dccl-sim's median call after the first; included = a one-round simulation's whole call, "
        "dccl-sim's data reading (and Ray start) plus the first call; max |Δθ̂| against the packed in-process θ̂):",
        "",
        "| devices | dccl-sim | Flower ms / client, startup excl. | incl. | dccl-sim ms / device, startup excl. | "
        "incl. | Flower ÷ dccl-sim, excl. | incl. | max abs θ̂ diff |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in r["points"]:
        flower = p["flower"]
        for name, label in FLOWER_REFERENCES.items():
            variant, ratios = p[name], p["flower_over_dccl_sim"][name]
            if name == "packed_ray":
                label += f", {variant['actors']} actors"
            diff = max(flower["max_abs_theta_diff"], variant.get("max_abs_theta_diff", 0.0))
            lines.append(
                f"| {p['devices']:,} | {label} | {_num(flower['ms_per_client_excluded'])} | "
                f"{_num(flower['ms_per_client_included'])} | {_num(variant['ms_per_device_excluded'])} | "
                f"{_num(variant['ms_per_device_included'])} | {_num(ratios['excluded'])}× | "
                f"{_num(ratios['included'])}× | {diff:.1e} |"
            )
    lines += ["", "Flower's round, per client: the client's own step (in its actor) and what the engine adds:", ""]
    lines += ["| devices | actors × torch threads | client step ms | engine overhead ms / client |"]
    lines += ["| ---: | ---: | ---: | ---: |"]
    for p in r["points"]:
        flower = p["flower"]
        threads = "/".join(str(t) for t in flower["torch_threads"])
        lines.append(
            f"| {p['devices']:,} | {flower['actors']} × {threads} | {_num(flower['client_step_ms'])} | "
            f"{_num(flower['engine_overhead_ms_per_client'])} |"
        )
    return lines


def _cloud_workers(r: dict[str, Any]) -> list[str]:
    u, model = r["update"], r["model"]
    runs = ", ".join(f"{run['workers']} → {run['t_distill_s']:.1f} s" for run in r["runs"])
    steps = ", ".join(f"{b} samples {1000 * s:.1f} ms" for b, s in r["step_s"].items())
    allreduce = "; ".join(
        f"{w} workers " + ", ".join(f"{k} {1000 * s:.2f} ms" for k, s in sizes.items())
        for w, sizes in r["allreduce_s"].items()
    )
    lines = [
        f"**Cloud workers** (docs/scale-out.md; `cloud.workers`, data-parallel). dccl round-0 cloud update on "
        f"{u['devices']:,} devices, 1 process on 1 thread: {u['total_s']:.1f} s, of which {u['in_loops_s']:.1f} s in "
        f"{u['steps']:.0f} data-parallel minibatch steps and {u['forward_s']:.1f} s of forward-only work the workers "
        f"share out; evaluation (worker 0) {u['evaluation_s']:.1f} s. A training step by part size: {steps}. "
        f"All-reduce of the gradient ({model['gradient_bytes'] / 1e6:.2f} MB, ×1 and ×16) over loopback: "
        f"{allreduce}. The real update on the embedded Ray, `cloud.workers` → `t_distill_s`: {runs}.",
        "",
        f"Projected cloud update per round at {r['project_devices']:,} devices (a projection from the cost model "
        "above: steps and forward-only work scaled linearly in devices, a step priced as the measured step on its part "
        "plus a ring all-reduce, the forward-only work split over the workers plus the all-reduce of its outputs):",
        "",
        "| network, regime | workers | minibatch | step ms | update s | speedup | efficiency |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for network, rows in r["projection"].items():
        for row in rows:
            lines.append(
                f"| {network} | {row['workers']} | {row['minibatch']:,} | {1000 * row['step_s']:.1f} | "
                f"{_num(row['update_s'])} | {row['speedup']:.2f} | {_percent(row['efficiency'])} |"
            )
    return lines
