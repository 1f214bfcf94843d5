"""A new user's first figure: `snakemake --cores all` on a fresh clone (dependencies installed), the
workflow that `make run` runs, timed from start to end, and to when results/default/heatmap.png (the
default heatmap) was written. The target is 30 s on an idle 2-core machine.

    .venv/bin/python benchmarks/first_figure.py            # clone HEAD into a temporary directory, run, time
    .venv/bin/python benchmarks/first_figure.py --busy     # the same, with a CPU-burning process on one core
    .venv/bin/python benchmarks/first_figure.py --cold     # as the first run in a new venv: no compiled bytecode
    .venv/bin/python benchmarks/first_figure.py --keep     # print where the clone is and leave it
    .venv/bin/python benchmarks/first_figure.py --rev 594d834   # an earlier commit, for a before/after figure
    .venv/bin/python benchmarks/first_figure.py -- results/default/heatmap.png   # the default heatmap alone
    .venv/bin/python benchmarks/first_figure.py -- --configfile /abs/tiny.yaml   # more snakemake arguments

The clone's own `patchmap` is used (PYTHONPATH), so what is timed is the committed code. As under `make`,
Python caches compiled bytecode (PYTHONDONTWRITEBYTECODE is unset): every job is a fresh Python that
imports torch and transformers, which a new venv compiles on its first run only. `--cold` points the
bytecode cache at an empty folder (PYTHONPYCACHEPREFIX), so every import compiles, as in that first run."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BURN = "while True: pass"


@contextmanager
def one_core_busy(enabled):
    """A process that keeps one core busy for as long as the block runs."""
    burner = subprocess.Popen([sys.executable, "-c", BURN]) if enabled else None
    try:
        yield
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()


def fresh_clone(where, rev=None):
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True)
    if rev:
        subprocess.run(["git", "-C", str(where), "checkout", "--quiet", rev], check=True)
    return where


def first_figure(clone, cores="all", extra=(), bytecode_cache=None):
    """Run the default workflow in `clone`; return (seconds, completed process). `bytecode_cache`: a folder
    for compiled bytecode instead of the packages' own __pycache__ folders."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(clone)
    if bytecode_cache:
        env["PYTHONPYCACHEPREFIX"] = str(bytecode_cache)
    started, start = time.time(), time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "snakemake", "--cores", cores, *extra], cwd=clone, env=env,
                            capture_output=True, text=True)
    return time.perf_counter() - start, result, started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    parser.add_argument("--cores", default="all")
    parser.add_argument("--keep", action="store_true", help="keep the clone and its results")
    parser.add_argument("--cold", action="store_true", help="no compiled bytecode, as a new venv's first run")
    parser.add_argument("--rev", help="the commit to time (default: HEAD)")
    parser.add_argument("snakemake_args", nargs="*", help="more arguments for snakemake (after --)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="patchmap-first-figure-"))
    try:
        clone = fresh_clone(tmp / "patchmap", args.rev)
        with one_core_busy(args.busy):
            seconds, result, started = first_figure(clone, args.cores, args.snakemake_args,
                                                    tmp / "bytecode" if args.cold else None)
        figure = clone / "results" / "default" / "heatmap.png"
        if result.returncode != 0 or not figure.exists():
            print(result.stderr[-4000:], file=sys.stderr)
            print(f"snakemake failed (exit {result.returncode}) after {seconds:.0f} s", file=sys.stderr)
            return 1
        cpus = len(os.sched_getaffinity(0))
        print(f"workflow: {seconds:.1f} s wall; first figure ({figure.relative_to(clone)}) written at "
              f"{figure.stat().st_mtime - started:.1f} s ({cpus} CPUs, --cores {args.cores}"
              f"{', one core kept busy by another process' if args.busy else ''}"
              f"{', no compiled bytecode' if args.cold else ''}{', commit ' + args.rev if args.rev else ''})")
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
