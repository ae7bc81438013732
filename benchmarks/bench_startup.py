"""Start-up time of the `deepseek-vl2` command and of `import deepseek_vl`, optionally beside an older checkout.

    python benchmarks/bench_startup.py [--baseline /path/to/old/checkout] [--repeats 5]

Each case runs in a fresh interpreter (as a user's shell does) and the median wall time is printed; with
--baseline the same cases run from that checkout and each line shows the ratio old / new.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "deepseek-vl2 --help": ["-m", "deepseek_vl", "--help"],
    "deepseek-vl2 --version": ["-m", "deepseek_vl", "--version"],
    "deepseek-vl2 generate hi --temprature 1 (argument error)": ["-m", "deepseek_vl", "generate", "hi", "--temprature", "1"],
    "deepseek-vl2 serve --help": ["-m", "deepseek_vl", "serve", "--help"],
    "import deepseek_vl": ["-c", "import deepseek_vl"],
}


def median_seconds(root: Path, args: list[str], repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(root)}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="an older checkout of this repository to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    print(f"{'case':58} {'now':>8}" + (f" {'baseline':>9} {'ratio':>7}" if args.baseline else ""))
    for name, case in CASES.items():
        now = median_seconds(here, case, args.repeats)
        line = f"{name:58} {now:7.2f}s"
        if args.baseline:
            old = median_seconds(args.baseline.resolve(), case, args.repeats)
            line += f" {old:8.2f}s {old / now:6.1f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
