"""Part 5, Flower's simulation engine side by side: not built, because Flower's simulation extra cannot be
installed next to dccl-sim (see NOTES.md). The part records that, so the results say why the comparison is
missing rather than leaving it out."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

# what `pip install --dry-run "flwr[simulation]"` said on 2026-11-21 (flwr 1.41.0, the newest release)
CONFLICT = (
    "flwr[simulation] 1.41.0 pins ray==2.55.1 (and protobuf<7, rich<15), while dccl-sim pins ray==2.60.0: "
    "installing it would replace this environment's Ray"
)


def measure() -> dict[str, Any]:
    if importlib.util.find_spec("flwr") is None:
        return {"status": "not installed", "reason": CONFLICT}
    return {
        "status": "not run",
        "flwr_version": importlib.metadata.version("flwr"),
        "reason": f"the side-by-side run is not built: {CONFLICT}",
    }
