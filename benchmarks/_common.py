"""What the benchmark scripts share: the CPU's name for the device column, and the CSV writer."""

from __future__ import annotations

import csv
import os
import platform


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (e.g. "AMD EPYC", "Intel(R) Xeon(R) ...")."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_csv(path: str, rows: list[dict], fields: list[str]) -> str:
    """Write rows (dicts keyed by `fields`) to path with a header, creating its folder; returns path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path
