"""The patch stage's choice of engine: run a PatchJob (patchmap.job) on the engine a run chooses, after the
intervention's check of the sites. The engines (patchmap.engines) return the same per-site datasets:

- `fast` (engines/fast): many patched runs per block call, nothing recomputed that a patch cannot change;
- `reference` (engines/reference.py): hooks on one full forward per layer, the ground truth.
"""

from .engines.fast.blocks import FastEngine
from .engines.fast.driver import run_fast
from .engines.reference import run_reference
from .errors import UserError
from .job import PatchJob

ENGINES = {"fast": run_fast, "reference": run_reference}


def check_sites(job: PatchJob) -> None:
    """The intervention's refusal of a site it cannot patch (e.g. knockout of every position)."""
    for site in job.sites:
        problem = job.intervention.site_problem(site.name, site.positions)
        if problem:
            raise UserError(problem)


def run_patch_job(job: PatchJob, engine="fast", **options) -> dict:
    """{site name: per-example metrics [example, layer]} for each site of `job`. `engine`: "fast" (its
    `options`, e.g. max_tokens, go to FastEngine), "reference", or a FastEngine to reuse (its stats then
    count this job too)."""
    check_sites(job)
    if isinstance(engine, FastEngine):
        return run_fast(job, engine)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}'; known: {', '.join(ENGINES)}")
    return ENGINES[engine](job, **options)
