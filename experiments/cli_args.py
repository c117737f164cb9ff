"""Argument parsing shared by the experiment scripts (run them as `python experiments/NAME.py`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def csv_list(kind: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse `type` for comma-separated values of `kind`, at least one."""

    def parse(text: str) -> list:
        try:
            values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            name = getattr(kind, "__name__", "value")
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse
