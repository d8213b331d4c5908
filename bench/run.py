"""Run batcher's benchmarks: ``python bench/run.py [--quick] [--only NAME]`` (``make bench``, ``QUICK=1``).

Every benchmark compares batcher with a raw baseline measured in the same run and prints
``name: ours X unit, baseline Y unit, ratio Z (target >= T) PASS|MISS``. A full run of every benchmark writes
``bench/results.json`` and ``bench/RESULTS.md``; a quick or ``--only`` run writes them to ``bench/out/``.
The exit code is 0 even when a target is missed (this reports, it does not gate), 1 when a benchmark crashes.

To add a benchmark, write ``bench/<name>.py`` with ``run(quick: bool) -> list[Result]`` and list it in
:data:`BENCHES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable from the repository root
    # in place of this script's own folder, whose ``http.py`` would shadow the standard library's ``http``
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import BENCH_DIR, PARTIAL_DIR, Result, write_results

#: benchmark modules, ``bench/<name>.py``, in the order they run
BENCHES: list[str] = ["intake", "pack", "collect", "e2e", "savings", "http"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small inputs, one run each: a smoke test")
    parser.add_argument("--only", metavar="NAME", action="append", choices=BENCHES, help="run only this benchmark")
    args = parser.parse_args(argv)

    results: list[Result] = []
    failed: list[str] = []
    started = time.perf_counter()
    for name in args.only or BENCHES:
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{name}")
            found: list[Result] = module.run(args.quick)
        except Exception:
            # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            continue
        for result in found:
            print(result.line(), flush=True)
        results.extend(found)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)

    complete = not args.quick and not args.only
    written = write_results(results, args.quick, BENCH_DIR if complete else PARTIAL_DIR)
    missed = sum(not r.passed for r in results)
    print(
        f"\n{len(results)} results, {len(results) - missed} pass, {missed} miss"
        + (f", {len(failed)} benchmark(s) crashed: {', '.join(failed)}" if failed else "")
        + f" ({time.perf_counter() - started:.1f} s); see {written.relative_to(BENCH_DIR.parent)}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
