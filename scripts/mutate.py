"""Mutation testing by hand-written mutations: does the suite notice a plausible one-line bug?

Each mutation in the list (``scripts/mutations.yaml`` by default) names a file, a snippet that
occurs in it exactly once, the snippet that replaces it, and the tests to run. The tree (tracked
and untracked, not ignored, files) is copied once to a scratch folder; every mutation is applied
there alone, its tests run with a timeout, and the file is restored. A mutation is *killed* when
its tests fail (or time out), *survived* when they pass. The kill rate is reported per module.

Imports come from the scratch copy, never from the checkout the venv's editable install points
at: ``PYTHONPATH`` puts the copy first for ``ssltk``, but the editable finder still maps
``ssltk.kernels`` to the checkout's ``kernels/`` (the package maps a top-level folder), so the
copy gets ``ssltk/kernels`` as a link to its own ``kernels/``, and a pytest plugin placed in the
copy stops the run unless ``ssltk.__file__`` and ``ssltk.kernels.__file__`` both lie inside it.

    .venv/bin/python scripts/mutate.py                      # every mutation of the list
    .venv/bin/python scripts/mutate.py --module evaluate    # one module's
    .venv/bin/python scripts/mutate.py --only eval-split --keep   # one, keeping the copy
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIST = Path(__file__).with_name("mutations.yaml")
GUARD = "_mutate_guard"
GUARD_SOURCE = '''"""Written by scripts/mutate.py: ssltk and ssltk.kernels must come from here."""

import os
from pathlib import Path


def pytest_configure(config):
    import ssltk
    import ssltk.kernels

    root = Path(os.environ["SSLTK_MUTATE_ROOT"]).resolve()
    for module in (ssltk, ssltk.kernels):
        where = Path(module.__file__).resolve()
        if root not in where.parents:
            raise SystemExit(f"mutate: {module.__name__} imported from {where}, not from {root}")
'''


@dataclass
class Mutation:
    id: str
    module: str
    file: str
    original: str
    mutated: str
    tests: list[str]
    why: str = ""
    outcome: str = ""
    seconds: float = 0.0
    detail: str = field(default="", repr=False)


def load_mutations(path: Path) -> list[Mutation]:
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    mutations = [Mutation(**entry) for entry in entries]
    ids = [m.id for m in mutations]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise SystemExit(f"mutate: duplicate ids in {path}: {', '.join(duplicates)}")
    return mutations


def tree_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree (deleted ones skipped)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted({name for name in out.split("\0") if name and (root / name).is_file()})


def make_scratch(root: Path, scratch: Path) -> None:
    for name in tree_files(root):
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    # ssltk.kernels lives in the top-level kernels/ (pyproject's package-dir): link it in place so
    # a plain path import finds the copy's kernels before the editable finder is asked.
    link = scratch / "ssltk" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    (scratch / f"{GUARD}.py").write_text(GUARD_SOURCE, encoding="utf-8")


def environment(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(scratch), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["SSLTK_MUTATE_ROOT"] = str(scratch)
    env.setdefault("TRITON_INTERPRET", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("CI", None)
    return env


def check_imports(python: str, scratch: Path, env: dict[str, str]) -> dict[str, str]:
    code = (
        "import json, ssltk, ssltk.kernels; "
        "print(json.dumps({'ssltk': ssltk.__file__, 'ssltk.kernels': ssltk.kernels.__file__}))"
    )
    done = subprocess.run(
        [python, "-c", code], cwd=scratch, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"mutate: cannot import ssltk in the scratch copy:\n{done.stderr}")
    where = json.loads(done.stdout)
    for name, path in where.items():
        if scratch.resolve() not in Path(path).resolve().parents:
            raise SystemExit(f"mutate: {name} resolves to {path}, outside {scratch}")
    return where


def run_tests(
    python: str, scratch: Path, env: dict[str, str], tests: list[str], timeout: float
) -> tuple[str, str]:
    """('passed' | 'failed' | 'timeout', the output's tail)."""
    command = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", GUARD]
    command += ["--no-header", "-o", "addopts=--strict-markers", *tests]
    try:
        done = subprocess.run(
            command,
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-2000:]
        return "timeout", tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    tail = (done.stdout + done.stderr)[-3000:]
    if "mutate: ssltk" in tail:
        raise SystemExit(f"mutate: import guard tripped:\n{tail}")
    if done.returncode == 0:
        return "passed", tail
    if done.returncode == 1:
        return "failed", tail
    if done.returncode in (4, 5):  # a bad test id, or nothing collected: the list is wrong
        raise SystemExit(f"mutate: pytest could not run {' '.join(tests)}:\n{tail}")
    return "error", tail  # collection or usage error: the mutation broke import, still a kill


def apply(scratch: Path, mutation: Mutation) -> str:
    path = scratch / mutation.file
    text = path.read_text(encoding="utf-8")
    count = text.count(mutation.original)
    if count != 1:
        raise SystemExit(
            f"mutate: {mutation.id}: the original snippet occurs {count} times in {mutation.file}"
        )
    path.write_text(text.replace(mutation.original, mutation.mutated), encoding="utf-8")
    return text


def summarise(mutations: list[Mutation]) -> str:
    modules = list(dict.fromkeys(m.module for m in mutations))
    lines = ["| module | mutations | killed | survived | kill rate |", "|---|---|---|---|---|"]
    for module in [*modules, "all"]:
        group = [m for m in mutations if module in ("all", m.module)]
        killed = sum(m.outcome != "survived" for m in group)
        rate = f"{100 * killed / len(group):.0f} %" if group else "–"
        lines.append(f"| {module} | {len(group)} | {killed} | {len(group) - killed} | {rate} |")
    lines += ["", "| id | module | outcome | seconds | what |", "|---|---|---|---|---|"]
    for m in mutations:
        lines.append(f"| {m.id} | {m.module} | {m.outcome} | {m.seconds:.0f} | {m.why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", type=Path, default=DEFAULT_LIST, help="the mutations (YAML)")
    parser.add_argument("--module", action="append", help="only these modules (repeatable)")
    parser.add_argument("--only", action="append", help="only these mutation ids (repeatable)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    parser.add_argument("--scratch", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--out", type=Path, help="also write the summary (markdown) and JSON here")
    parser.add_argument("--check", action="store_true", help="only check every snippet applies")
    args = parser.parse_args(argv)

    mutations = load_mutations(args.list)
    if args.module:
        mutations = [m for m in mutations if m.module in args.module]
    if args.only:
        mutations = [m for m in mutations if m.id in args.only]
    if not mutations:
        raise SystemExit("mutate: no mutation selected")
    if args.check:
        for m in mutations:
            count = (ROOT / m.file).read_text(encoding="utf-8").count(m.original)
            if count != 1:
                raise SystemExit(f"mutate: {m.id}: the original occurs {count} times in {m.file}")
            paths = [t for t in m.tests if not t.startswith("-")]  # options pass through
            missing = [t for t in paths if not (ROOT / t.split("::")[0]).is_file()]
            if missing:
                raise SystemExit(f"mutate: {m.id}: no test file {', '.join(missing)}")
        print(f"mutate: {len(mutations)} mutations apply")
        return 0

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="ssltk-mutate-"))
    scratch.mkdir(parents=True, exist_ok=True)
    make_scratch(ROOT, scratch)
    env = environment(scratch)
    where = check_imports(args.python, scratch, env)
    print(f"mutate: scratch copy {scratch}; ssltk.kernels from {where['ssltk.kernels']}")
    try:
        # Every mutation is first checked against an unmutated copy: a kill must be the mutation's.
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
            started = time.perf_counter()
            outcome, tail = run_tests(args.python, scratch, env, tests, args.timeout * 2)
            print(f"mutate: baseline {outcome} in {time.perf_counter() - started:.0f} s")
            if outcome != "passed":
                print(tail)
                return 2
        for i, mutation in enumerate(mutations, start=1):
            original = apply(scratch, mutation)
            started = time.perf_counter()
            try:
                outcome, tail = run_tests(args.python, scratch, env, mutation.tests, args.timeout)
            finally:
                (scratch / mutation.file).write_text(original, encoding="utf-8")
            mutation.seconds = time.perf_counter() - started
            mutation.outcome = "survived" if outcome == "passed" else f"killed ({outcome})"
            mutation.detail = tail
            print(
                f"[{i}/{len(mutations)}] {mutation.id} ({mutation.module}): {mutation.outcome} "
                f"in {mutation.seconds:.0f} s",
                flush=True,
            )
    finally:
        if not args.keep and args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = summarise(mutations)
    print(summary)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mutation-summary.md").write_text(summary, encoding="utf-8")
        records = [{k: v for k, v in vars(m).items()} for m in mutations]
        (args.out / "mutation-results.json").write_text(
            json.dumps(records, indent=2) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
