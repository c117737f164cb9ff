"""dccl-sim from Python, as in a notebook (README, "A walkthrough in Python"): settings as a dict, two strategies run
on 300 MovieLens-100K users in this process, their rounds read back as pandas DataFrames, compared in a table and a
plot. The README shows this file's code from `import` on; tests/test_examples.py checks the two stay equal.

    python examples/walkthrough.py        # from the repository root; about a minute; writes runs/walkthrough/
"""

import matplotlib.pyplot as plt
import pandas as pd

import dccl_sim

# Any setting `--set` takes, nested as in a config file: 300 MovieLens-100K users, 2 rounds, no Ray.
SETTINGS = {
    "data": {"source": "ml100k", "num_devices": 300},
    "rounds": 2,
    "runtime": {"backend": "local"},
    "output": {"progress": False, "overwrite": True},
}
STRATEGIES = ["cloud_only", "dccl"]
METRICS = ["broadcast_gauc", "device_gauc", "cloud_gauc", "tail_device_gauc", "device_ndcg@10"]


def run_strategies(settings: dict, strategies: list[str], out: str) -> pd.DataFrame:
    """Run each strategy into OUT/<strategy>; return all their rounds in one DataFrame."""
    for strategy in strategies:
        output = {**settings.get("output", {}), "out_dir": f"{out}/{strategy}"}
        config = dccl_sim.SimConfig.model_validate({**settings, "strategy": strategy, "output": output})
        dccl_sim.run(config)
    # a finished run reads back from its folder, in this session or any later one
    return pd.concat([dccl_sim.load_run(f"{out}/{strategy}").rounds for strategy in strategies], ignore_index=True)


def compare(rounds: pd.DataFrame) -> pd.DataFrame:
    """The last round's metrics, one row per strategy, and the personalization gain device − broadcast."""
    last = rounds[rounds["round"] == rounds["round"].max()]
    table = last.groupby("strategy")[METRICS].mean()
    table["gain"] = table["device_gauc"] - table["broadcast_gauc"]
    return table


def plot(rounds: pd.DataFrame, path: str) -> None:
    """GAUC per round of each strategy's personalized device models (solid) and updated cloud (dashed)."""
    gauc = rounds.pivot(index="round", columns="strategy", values=["device_gauc", "cloud_gauc"])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120, layout="constrained")
    for strategy in gauc["device_gauc"].columns:
        (line,) = ax.plot(gauc["device_gauc"][strategy], marker="o", label=f"{strategy}: device models")
        ax.plot(gauc["cloud_gauc"][strategy], marker="s", ls="--", color=line.get_color(), label=f"{strategy}: cloud")
    ax.set_xticks(gauc.index)
    ax.set(xlabel="round", ylabel="GAUC (test split)", title="Device and cloud GAUC per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    rounds = run_strategies(SETTINGS, STRATEGIES, "runs/walkthrough")
    print(compare(rounds).round(4).to_string())
    plot(rounds, "runs/walkthrough/gauc.png")
