"""Patch jobs in tests: every site, a job on either engine in one call, and the check that both engines
agree."""

from patchmap import activations, models
from patchmap.engines.fast.blocks import FastEngine
from patchmap.interventions import from_run
from patchmap.job import PatchJob
from patchmap.patching import run_patch_job
from patchmap.sites import COMPONENTS, POSITION_GROUPS, Site
from tolerances import assert_datasets_close

# every component but head at every position group; a head site patches each head, so a few position groups
# of head sites (one with an empty group: no middle in a 2-token subject) keep the tests' time down
ALL_SITES = [Site(f"{c}-{p}", f"{c}@{p}", c, p) for c in COMPONENTS if c != "head" for p in POSITION_GROUPS]
HEAD_SITES = [Site(f"head-{p}", f"head@{p}", "head", p) for p in ("subject", "subject_middle", "last", "all")]


def run_intervention(name="swap", **settings):
    """The intervention `name` as a run with `settings` (pairing, noise_scale, noise_samples, value) makes it."""
    return from_run({"intervention": name, "pairing": "subject", "noise_scale": 3.0, "noise_samples": 1,
                     "value": "mean", **settings})


def all_layers(model):
    return list(range(models.n_layers(model)))


def extract(model, tokenizer, pairs, sites, layers=None, batch_size=4):
    """The source activations of `pairs` at `sites`, every layer unless `layers` says otherwise."""
    return activations.extract_activations(model, pairs, sites, all_layers(model) if layers is None else layers,
                                           batch_size, tokenizer.pad_token_id, False)


def patch_job(model, tokenizer, pairs, sources, sites, layers=None, batch_size=4, engine="fast", window=1,
              intervention=None, **options):
    """run_patch_job on the job these make up (every layer unless `layers` says otherwise); the intervention
    is the one the pairs were made for (pairs.attrs), unless given."""
    job = PatchJob(model=model, pairs=pairs, sites=sites, layers=all_layers(model) if layers is None else layers,
                   batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                   intervention=intervention or run_intervention(pairs.attrs["intervention"]), sources=sources,
                   window=window, progress=False)
    return run_patch_job(job, engine=engine, **options)


def engines_agree(model, tokenizer, pairs, sources, sites, layers=None, batch_size=4, window=1, intervention=None,
                  **options):
    """Both engines on the same job; asserts that they agree (the same datasets, the same numbers within
    tests/tolerances.py); returns the reference's results, the fast engine's and the FastEngine (for its
    counters). `options` go to FastEngine."""
    reference = patch_job(model, tokenizer, pairs, sources, sites, layers, batch_size, "reference", window, intervention)
    engine = FastEngine(model, **options)
    fast = patch_job(model, tokenizer, pairs, sources, sites, layers, batch_size, engine, window, intervention)
    for name, ref in reference.items():
        got = fast[name]
        assert got.attrs == ref.attrs and list(got.data_vars) == list(ref.data_vars)
        assert got["js"].dims == ref["js"].dims and (got["example"].values == ref["example"].values).all()
        assert got.attrs["window"] == window
    assert_datasets_close(reference, fast)
    return reference, fast, engine
