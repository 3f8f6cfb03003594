"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model and the torch thread count (what a CSV row records)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{threads} threads"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{threads} threads"


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append `rows` to the CSV at `path`, writing the header when the file is new."""
    import csv

    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")
