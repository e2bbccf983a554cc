"""`astrai bench`: run the repository's benchmarks and print one table.

A benchmark is a file `benchmarks/bench_<name>.py` with `main(argv: list[str] | None = None) -> list[dict]`.
Each returned row is a `BenchRow`-shaped dict: what was measured, our figure, the peer's figure measured in the
same run, and the machine's limit for that figure. The benchmark may print its own details; this command prints
the combined table at the end.

A benchmark whose imports are not installed (on a serving box, `bench_train` needs astrai-train; the HF peer
needs transformers) is skipped with a line saying what to install, not counted as a failure; a run in which
nothing could be measured fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from astrai.cli.version import providing_distribution


@dataclass
class BenchRow:
    benchmark: str
    metric: str  # e.g. "decode batch 1, fp32"
    unit: str  # e.g. "tok/s"
    ours: float
    peer: float | None = None
    peer_name: str = ""  # e.g. "HF generate"
    limit: float | None = None  # the machine's bound for this figure, same unit
    limit_name: str = ""  # e.g. "memory-bandwidth bound"

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer if self.peer else None

    @property
    def share_of_limit(self) -> float | None:
        return self.ours / self.limit if self.limit else None


def _row(raw: dict, benchmark: str) -> BenchRow:
    known = {f.name for f in fields(BenchRow)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"benchmark {benchmark!r} returned a row with unknown keys {unknown}; allowed: {sorted(known)}"
        )
    return BenchRow(**{"benchmark": benchmark, **raw})


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def format_table(rows: list[BenchRow]) -> str:
    header = ["benchmark", "metric", "ours", "peer", "ours/peer", "limit", "ours/limit", "unit", "peer / limit"]
    body = [
        [
            r.benchmark,
            r.metric,
            _fmt(r.ours),
            _fmt(r.peer),
            f"{r.ratio:.2f}x" if r.ratio is not None else "-",
            _fmt(r.limit),
            f"{100 * r.share_of_limit:.0f}%" if r.share_of_limit is not None else "-",
            r.unit,
            " / ".join(x for x in (r.peer_name, r.limit_name) if x),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def discover(directory: Path, only: list[str] | None) -> list[Path]:
    if not directory.is_dir():
        raise ValueError(f"benchmark folder {directory} does not exist (run from the repository root or pass --dir)")
    found = sorted(directory.glob("bench_*.py"))
    names = {p.stem.removeprefix("bench_"): p for p in found}
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise ValueError(f"unknown benchmark(s) {missing}; available: {sorted(names)}")
        return [names[n] for n in only]
    return found


def run_benchmark(path: Path, argv: list[str]) -> list[BenchRow]:
    name = path.stem.removeprefix("bench_")
    spec = importlib.util.spec_from_file_location(f"astrai_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise ValueError(f"{path} has no main(argv) function")
    return [_row(raw, name) for raw in module.main(argv) or []]


def missing_requirement(exc: ModuleNotFoundError) -> str:
    """What to install for a benchmark that could not import `exc.name`."""
    module = exc.name or str(exc)
    top = module.partition(".")[0]
    dist = providing_distribution(module) or (top if top != "astrai" else None)
    return f"needs {module}: pip install {dist}" if dist else f"needs {module}, which no AstrAI distribution ships"


def _run(args: argparse.Namespace) -> int:
    paths = discover(Path(args.dir), args.only)
    rows: list[BenchRow] = []
    failed, skipped = [], []
    for path in paths:
        start = time.perf_counter()
        print(f"== {path.name}", flush=True)
        try:
            rows += run_benchmark(path, ["--quick"] if args.quick else [])
        except ModuleNotFoundError as exc:
            skipped.append(path.name)
            print(f"   skipped: {path.name} {missing_requirement(exc)}", file=sys.stderr)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failed.append(path.name)
            print(f"   failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print(format_table(rows))
    if skipped:
        print(f"\nskipped (not installed here): {', '.join(skipped)}", file=sys.stderr)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or len(skipped) == len(paths) else 0


def configure(parser: argparse.ArgumentParser) -> None:
    """Run the benchmarks and print ours, the peer measured in the same run, and the machine limit."""
    parser.add_argument("only", nargs="*", help="benchmark names (bench_<name>.py); default: all")
    parser.add_argument("--dir", default="benchmarks", help="folder holding bench_*.py (default: ./benchmarks)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.set_defaults(run=_run)
