"""What the ``kvtier`` operator commands share (warm, fsck, prefetch, inspect, doctor): the
progress bar and how a summary is printed."""

from __future__ import annotations

import json
import sys
from typing import Any


def progress_bar(quiet: bool, desc: str, total: int, unit: str = "it", unit_scale: bool = False) -> Any:
    """A tqdm bar on stderr (items or bytes, rate, ETA), or None with ``--quiet`` or when stderr is
    not a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000,
                desc=desc, file=sys.stderr)


def print_json(obj: Any) -> None:
    """One JSON object on stdout, for scripts."""
    print(json.dumps(obj, sort_keys=True))


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
