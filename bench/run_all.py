"""Every benchmark in one go, one after another (they share the machine): writes bench/results/*.json.

    python bench/run_all.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [
    ["latency.py", "--service", "data", "--n", "1000"],
    ["throughput.py", "--service", "data"],
    ["throughput.py", "--service", "nlp"],
    ["throughput.py", "--service", "vision"],
    ["throughput.py", "--service", "vision", "--vision-classify", "--n", "64"],
    ["throughput.py", "--service", "llm", "--n", "32"],
]


def main() -> None:
    for run in RUNS:
        print("==>", " ".join(run), flush=True)
        subprocess.run([sys.executable, str(HERE / run[0]), *run[1:]], check=True)


if __name__ == "__main__":
    main()
