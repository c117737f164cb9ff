"""`make bench`: the benchmark harness of issue 6 (see NOTES.md). Run it as `python -m bench` with `experiments/` on
the path; each part writes one JSON file, and `README_table.md` sums them up."""

# dccl_sim sets OMP_WAIT_POLICY before torch loads, so every part (the matmul ceiling included) measures torch as
# a simulation runs it
import dccl_sim  # noqa: F401
