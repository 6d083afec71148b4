"""``python -m sandbox.bench [--report bench/report.json] [--smoke]``: run the benchmark, print the table.
``python -m sandbox.bench --scale 1000,5000 [--report bench/scale.json]``: the backfill's scale curve."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from sandbox.bench.report import print_report, print_scale
from sandbox.bench.run import InvalidRun, Sizes, run
from sandbox.bench.scale import run_scale
from sandbox.bench.simclock import BENCH_INSTANT

SMOKE = Sizes(
    patients=24,
    appointments=40,
    day_changes=6,
    day_cycles=2,
    loop_sample=2,
    webhooks=20,
    webhook_seconds=0.5,
    unsubscribe_samples=1,
    import_runs=1,
    parallel=False,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.bench")
    parser.add_argument("--report", help="default: bench/report.json, or bench/scale.json with --scale")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing, proves nothing")
    parser.add_argument("--verbose", action="store_true", help="log every invocation of the backfill")
    parser.add_argument("--crm", action="append", choices=("bitrix24", "amocrm"), help="default: both")
    parser.add_argument("--twice", action="store_true", help="run again and fail unless the simulated figures match")
    parser.add_argument(
        "--scale",
        type=_appointment_counts,
        metavar="N[,N...]",
        help="instead: clinicsync's backfill of clinics seeded with N appointments each (e.g. 1000,5000)",
    )
    parser.add_argument("--serial", action="store_true", help="with --scale: every point in this process (tests)")
    parser.add_argument(
        "--at",
        default=BENCH_INSTANT,
        help="the wall clock every run starts at (ISO 8601 with offset; default: the recorded run's), or 'now'",
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    if args.crm:
        sizes.crms = tuple(args.crm)
    sizes.wall_clock = None if args.at == "now" else args.at
    log = functools.partial(print, file=sys.__stderr__, flush=True)
    started = _provenance()
    try:
        if args.scale:
            report = run_scale(
                args.scale,
                sizes.crms,
                log=log,
                parallel=not args.serial,
                twice=args.twice,
                verbose=args.verbose,
                wall_clock=sizes.wall_clock,
            )
        else:
            report = run(sizes, log=log, verbose=args.verbose, twice=args.twice)
    except InvalidRun as exc:
        log(f"bench FAILED, no report: {exc}")
        return 2
    report["provenance"] = started | {"load_end": round(os.getloadavg()[0], 1)}
    path = Path(args.report or ("bench/scale.json" if args.scale else "bench/report.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (print_scale if args.scale else print_report)(report)
    print(f"report: {path}")
    if report["determinism"] and not report["determinism"]["identical"]:
        diffs = "\n  ".join(report["determinism"]["differences"])
        log(f"bench FAILED: the second run's simulated figures differ:\n  {diffs}")
        return 3
    return 0


def _provenance() -> dict[str, object]:
    """Which code ran, when and on how loaded a machine: the README quotes a run by these."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "load_start": round(os.getloadavg()[0], 1),
    }


def _appointment_counts(text: str) -> list[int]:
    try:
        counts = [int(part.replace("_", "")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of appointment counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("appointment counts must be positive")
    return sorted(set(counts))


if __name__ == "__main__":
    sys.exit(main())
