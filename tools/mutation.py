"""Mutation testing of the model: generate mutmut's mutants, score a seeded sample.

`make mutation` runs this in .venv-mutation. mutmut (pinned in
constraints-mutation.txt) writes every mutant of the files [tool.mutmut] names
into mutants/, records which tests reach each function, and runs per mutant only
those tests, fastest first, stopping at the first failure. Scoring every mutant
takes many hours on two cores, so --sample N draws N of them with --seed and
scores those; --sample 0 scores all.

The result goes to stdout and to mutants/score.json: counts by status, the score
(killed + timeout over all scored), and the diff of every survivor.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from mutmut import __main__ as mutmut_main
from mutmut.core import MutmutCallStack
from mutmut.mutation.data import SourceFileMutationData
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

REPORT = Path("mutants/score.json")
DETECTED = {"killed", "timeout", "caught by type check", "segfault"}


def generate(workers: int) -> list[str]:
    """The names of every mutant, after writing them to mutants/ (what `mutmut run`
    does before it runs anything)."""
    mutmut_main.set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    mutmut_main.copy_src_dir()
    mutmut_main.copy_also_copy_files()
    mutmut_main.setup_source_paths()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every file's path
        mutmut_main.create_mutants(workers)
    return sorted(name for data in _mutation_data() for name in data.exit_code_by_key)


def _mutation_data() -> list[SourceFileMutationData]:
    found = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        found.append(data)
    return found


class _CallerOfThisThread(threading.local):
    value: tuple[str | None, int] = (None, 0)


def _call_stack_without_contextvars() -> None:
    """mutmut 3.8.1 records which function called which in a ContextVar that every
    trampoline sets and resets. In the whole suite's stats run (never in a plain
    pytest run of the same tests with the same trampolines) that failed twice on
    CPython 3.11.7: a reset found the variable unset (LookupError), and the
    interpreter crashed in a trampoline (SIGSEGV). The same stack, kept per thread
    in a plain attribute, records the same callers: the tests are synchronous, so a
    thread's calls nest."""
    caller = _CallerOfThisThread()

    def get(cls: type) -> tuple[str | None, int]:
        return caller.value

    def set_(cls: type, value: tuple[str | None, int]) -> tuple[str | None, int]:
        previous, caller.value = caller.value, value
        return previous

    def reset(cls: type, previous: tuple[str | None, int]) -> None:
        caller.value = previous

    for name, fn in (("get", get), ("set", set_), ("reset", reset)):
        setattr(MutmutCallStack, name, classmethod(fn))


def run(names: list[str], workers: int) -> None:
    """`mutmut run NAMES`, in this process (forked workers inherit the patch)."""
    _call_stack_without_contextvars()
    os.environ["GUESTMEM_HYPOTHESIS_PROFILE"] = "mutation"  # tests/conftest.py
    with contextlib.suppress(SystemExit):
        mutmut_main.cli(["run", "--max-children", str(workers), *names], standalone_mode=False)


def statuses(names: list[str]) -> dict[str, str]:
    """mutmut's verdict for each name, from the .meta files it keeps."""
    wanted = set(names)
    return {name: status_by_exit_code[code]
            for data in _mutation_data()
            for name, code in data.exit_code_by_key.items() if name in wanted}


def diff_of(name: str) -> str:
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name],
                           capture_output=True, text=True, check=False)
    return shown.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=0, help="mutants to score; 0: all")
    parser.add_argument("--seed", type=int, default=1, help="fixes the sample")
    parser.add_argument("--workers", type=int, default=2, help="mutmut's --max-children")
    parser.add_argument("--fail-under", type=float, default=90.0,
                        help="exit 1 when the score (percent) is lower")
    parser.add_argument("names", nargs="*",
                        help="score these mutants (as `mutmut results` names them) instead")
    parser.add_argument("--report-only", action="store_true",
                        help="score what the last run left in mutants/, run nothing")
    args = parser.parse_args()

    names = generate(args.workers)
    total = len(names)
    if args.names:
        unknown = set(args.names) - set(names)
        if unknown:
            parser.error(f"no such mutants: {', '.join(sorted(unknown))}")
        names = sorted(args.names)
        print(f"{len(names)} of {total} mutants, by name", flush=True)
    else:
        if 0 < args.sample < total:
            names = sorted(random.Random(args.seed).sample(names, args.sample))
        print(f"{len(names)} of {total} mutants (seed {args.seed})", flush=True)
    if not args.report_only:
        run(names, args.workers)

    verdicts = statuses(names)
    counts = Counter(verdicts.values())
    detected = sum(n for status, n in counts.items() if status in DETECTED)
    scored = sum(n for status, n in counts.items() if status != "not checked")
    survivors = sorted(name for name, status in verdicts.items() if status not in DETECTED
                       and status != "not checked")
    report = {
        "mutants": total, "sample": len(names), "seed": args.seed,
        "counts": dict(counts), "score": detected / scored if scored else None,
        "survivors": {name: {"status": verdicts[name], "diff": diff_of(name)}
                      for name in survivors},
    }
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    for name, survivor in report["survivors"].items():
        print(f"\n{survivor['status']}: {name}\n{survivor['diff']}")
    print(f"\n{dict(counts)}")
    if scored:
        print(f"score: {detected}/{scored} = {detected / scored:.1%}  (details: {REPORT})")
    if scored < len(names):
        print(f"{len(names) - scored} mutants were not checked")
        return 1
    return 0 if scored and 100 * detected / scored >= args.fail_under else 1


if __name__ == "__main__":
    sys.exit(main())
