"""Run every benchmark in this folder and collect their figures into one markdown report.

Each benchmark prints a readable table and ends with one JSON line of figures; this runner keeps
the full output of each and tabulates the JSON. A benchmark that fails is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _timing import Stopwatch

HERE = Path(__file__).resolve().parent


def run(script: Path, extra: list[str]) -> tuple[int, str, dict | None, float]:
    watch = Stopwatch()
    proc = subprocess.run(
        [sys.executable, str(script), *extra], capture_output=True, text=True, check=False
    )
    elapsed = watch.elapsed()
    output = proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.returncode else "")
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    figures = None
    if lines:
        try:
            figures = json.loads(lines[-1])
        except json.JSONDecodeError:
            figures = None
    return proc.returncode, output, figures, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks.md"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("names", nargs="*", help="benchmark names (default: all)")
    args = parser.parse_args()

    scripts = sorted(p for p in HERE.glob("[!_]*.py") if p.name != Path(__file__).name)
    if args.names:
        scripts = [p for p in scripts if p.stem in args.names]
    sections, failed = [], 0
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        code, output, figures, elapsed = run(script, ["--device", args.device])
        print(output, flush=True)
        status = "ok" if code == 0 and figures is not None else f"FAILED (exit {code})"
        failed += status != "ok"
        body = json.dumps(figures, indent=2) if figures else "no JSON figures"
        sections.append(
            f"## {script.stem}\n\n{status}, {elapsed:.0f} s on {args.device}\n\n"
            f"```\n{output.strip()}\n```\n\nFigures:\n\n```json\n{body}\n```\n"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Benchmarks\n\n" + "\n".join(sections))
    print(f"wrote {args.out} ({len(scripts)} benchmarks, {failed} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
