"""``python -m sandbox.bench [--report bench/report.json] [--smoke]``: run the benchmark, print the table."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from sandbox.bench.report import print_report
from sandbox.bench.run import InvalidRun, Sizes, run

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
    parser.add_argument("--report", default="bench/report.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing, proves nothing")
    parser.add_argument("--verbose", action="store_true", help="log every invocation of the backfill")
    parser.add_argument("--crm", action="append", choices=("bitrix24", "amocrm"), help="default: both")
    parser.add_argument("--twice", action="store_true", help="run again and fail unless the simulated figures match")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    if args.crm:
        sizes.crms = tuple(args.crm)
    log = functools.partial(print, file=sys.__stderr__, flush=True)
    try:
        report = run(sizes, log=log, verbose=args.verbose, twice=args.twice)
    except InvalidRun as exc:
        log(f"bench FAILED, no report: {exc}")
        return 2
    path = Path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print_report(report)
    print(f"report: {path}")
    if report["determinism"] and not report["determinism"]["identical"]:
        diffs = "\n  ".join(report["determinism"]["differences"])
        log(f"bench FAILED: the second run's simulated figures differ:\n  {diffs}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
