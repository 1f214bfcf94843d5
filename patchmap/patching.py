"""The patch stage's choice of engine: run a PatchJob (patchmap.job) on the engine a run chooses, after the
intervention's check of the sites. The engines (patchmap.engines) return the same per-site datasets:

- `fast` (engines/fast): many patched runs per block call, nothing recomputed that a patch cannot change;
- `reference` (engines/reference.py): hooks on one full forward per layer, the ground truth.
"""

from dataclasses import replace

from .engines.fast.blocks import FastEngine
from .engines.fast.driver import run_fast
from .engines.memory import keep_freed_memory
from .engines.reference import run_reference
from .errors import UserError
from .job import PatchJob, stack_heads
from .models import head_shape
from .sites import one_per_head

ENGINES = {"fast": run_fast, "reference": run_reference}


def check_sites(job: PatchJob) -> None:
    """The intervention's refusal of a site it cannot patch (e.g. knockout of every position)."""
    for site in job.sites:
        problem = job.intervention.site_problem(site.name, site.positions, site.component)
        if problem:
            raise UserError(problem)


def run_patch_job(job: PatchJob, engine="fast", **options) -> dict:
    """{site name: per-example metrics [example, layer], [example, layer, head] for a head site} for each
    site of `job`. A head site runs as one site per head (each patches its head alone). `engine`: "fast"
    (its `options`, e.g. max_tokens, go to FastEngine), "reference", or a FastEngine to reuse (its stats then
    count this job too)."""
    check_sites(job)
    keep_freed_memory()
    if not isinstance(engine, FastEngine) and engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}'; known: {', '.join(ENGINES)}")
    heads = head_shape(job.model)[0] if any(s.has_heads for s in job.sites) else 0
    each = {s.name: one_per_head(s, heads) if s.has_heads else [s] for s in job.sites}
    patched = replace(job, sites=[s for sites in each.values() for s in sites])
    per_key = run_fast(patched, engine) if isinstance(engine, FastEngine) else ENGINES[engine](patched, **options)
    return {s.name: stack_heads([per_key[h.key] for h in each[s.name]]) if s.has_heads else per_key[s.key]
            for s in job.sites}
