"""`make bench`: the benchmark harness of issue 6 (see NOTES.md). Run it as `python -m bench` with `experiments/` on
the path; each part writes one JSON file, and `README_table.md` sums them up."""
