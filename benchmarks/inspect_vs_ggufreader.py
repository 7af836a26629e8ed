"""Opening a GGUF: ``anepack inspect`` against gguf-py's ``GGUFReader``, measured in one run.

Each contender runs in a fresh Python process; wall time and peak resident memory come from
``os.wait4`` on that process. Prints the ratios against GGUFReader, the baseline.

    python benchmarks/inspect_vs_ggufreader.py [MODEL]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from anepack.source.default_model import resolve_model


def measure(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak MB) of one process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed: {process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    model = str(resolve_model(sys.argv[1] if len(sys.argv) > 1 else None))
    python = sys.executable
    contenders = {
        "gguf.GGUFReader(path)": [python, "-c", f"import gguf; gguf.GGUFReader({model!r})"],
        "anepack inspect --no-stats": [python, "-m", "anepack.cli", "inspect", model, "--no-stats", "--json"],
        "anepack inspect (with stats)": [python, "-m", "anepack.cli", "inspect", model, "--json"],
    }
    results = {name: measure(argv) for name, argv in contenders.items()}
    base_seconds, base_mb = results["gguf.GGUFReader(path)"]
    print(f"model: {model}")
    print(f"{'contender':32s} {'seconds':>8s} {'peak MB':>8s} {'time ratio':>11s} {'memory ratio':>13s}")
    for name, (seconds, mb) in results.items():
        print(f"{name:32s} {seconds:8.2f} {mb:8.0f} {seconds / base_seconds:10.2f}x {mb / base_mb:12.2f}x")
    print("targets: inspect --no-stats < 3 s and < 400 MB; with stats < 1.5 GB")


if __name__ == "__main__":
    main()
