"""Where a process spends its time under load: py-spy samples, and a summary of the top self-time functions.

``with recording(pid, "nlp-agent", seconds, out_dir) as rec: <drive load>`` runs two ``py-spy record
--nonblocking`` on ``pid`` for ``seconds`` (sampling without pausing the process): one writes
``<name>.speedscope.json`` (open it at https://www.speedscope.app), one ``<name>.raw.txt`` (collapsed
stacks, ``frame;frame;frame count``). When the block ends it waits for both, then ``rec`` holds the
summary from the raw stacks: samples, the top functions by self time (the innermost frame of a sample)
and by total time (any frame of it), each with its share of the samples. ``summary_md`` renders those.

What can go wrong: py-spy missing, or not allowed to read the process (ptrace: run as the same user, or
with CAP_SYS_PTRACE), leaves ``rec["skipped"]`` with py-spy's message instead of raising. py-spy is
stopped by PID if it outlives its duration by 30 s.

Named ``profiling``, not ``profile``: scripts under bench/ run by path put bench/ first on ``sys.path``, where
a ``profile.py`` would shadow the standard library's (``cProfile`` imports it; transformers imports cProfile).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TOP = 15


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: one row per function, not per line."""
    name, _, where = frame.partition(" (")
    file = where.split(":")[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file})" if file else name


def summarize(raw: str, top: int = TOP) -> dict[str, Any]:
    """Top self-time and total-time functions from py-spy's collapsed stacks."""
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread (")]
        if not frames:
            continue
        self_time[frames[-1]] += n
        for f in set(frames):
            total_time[f] += n

    def share(n: int) -> float:
        return round(n / samples, 4) if samples else 0.0

    top_self = [
        {"function": f, "samples": n, "share": share(n), "total_share": share(total_time[f])}
        for f, n in self_time.most_common(top)
    ]
    top_total = [{"function": f, "samples": n, "share": share(n)} for f, n in total_time.most_common(top)]
    return {"samples": samples, "top_self": top_self, "top_total": top_total}


@contextlib.contextmanager
def recording(pid: int, name: str, seconds: float, out_dir: Path, rate: int = 100) -> Iterator[dict[str, Any]]:
    """py-spy on ``pid`` for ``seconds`` while the block runs; the dict is filled with the summary after."""
    rec: dict[str, Any] = {"pid": pid, "seconds": seconds, "rate_hz": rate}
    # make runs .venv/bin/python without activating the venv: py-spy sits beside the interpreter, not on PATH.
    beside = Path(sys.executable).with_name("py-spy")
    spy = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if spy is None:
        rec["skipped"] = "py-spy not installed (pip install -e '.[bench]')"
        yield rec
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"speedscope": out_dir / f"{name}.speedscope.json", "raw": out_dir / f"{name}.raw.txt"}
    procs = {
        fmt: subprocess.Popen(
            [
                spy,
                "record",
                "--nonblocking",
                "-p",
                str(pid),
                "-d",
                str(max(1, round(seconds))),
                "-r",
                str(rate),
                "--format",
                fmt,
                "-o",
                str(path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for fmt, path in files.items()
    }
    try:
        yield rec
    finally:
        messages = {}
        for fmt, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate(timeout=10)
            messages[fmt] = out.decode(errors="replace")[-500:]
        if files["raw"].exists() and files["raw"].stat().st_size:
            rec.update(summarize(files["raw"].read_text(errors="replace")))
            rec["files"] = {fmt: str(path) for fmt, path in files.items() if path.exists()}
        else:
            rec["skipped"] = f"py-spy wrote no samples: {messages}"


def summary_md(profiles: dict[str, dict[str, Any]], top: int = 10) -> str:
    """Markdown: per profiled process, its top self-time functions."""
    lines = ["## Profile (py-spy, top self time)", ""]
    for name, rec in profiles.items():
        if "skipped" in rec or "failed" in rec:
            lines += [
                f"{name}: {'skipped' if 'skipped' in rec else 'failed'}: {rec.get('skipped', rec.get('failed'))}",
                "",
            ]
            continue
        lines += [
            f"**{name}** ({rec['samples']} samples over {rec['seconds']} s at {rec['rate_hz']} Hz; "
            f"speedscope: `{Path(rec['files'].get('speedscope', '')).name}`)",
            "",
            "| function | self share | total share |",
            "|---|---|---|",
        ]
        totals = {r["function"]: r["share"] for r in rec["top_total"]}
        for row in rec["top_self"][:top]:
            total = row.get("total_share", totals.get(row["function"]))
            lines.append(f"| `{row['function']}` | {row['share']:.1%} | {'' if total is None else f'{total:.1%}'} |")
        lines.append("")
    lines += [
        "Self time is the innermost Python frame of a sample. Under uvloop (the edge) the event loop is C, so its "
        "own work (I/O, scheduling) shows as self time of `Runner.run`.",
        "",
    ]
    return "\n".join(lines)
