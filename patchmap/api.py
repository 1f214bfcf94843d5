"""The Python API for notebooks: the workflow's engine on a model, tokenizer and facts in memory.

    from patchmap.api import patch_heatmap, trace
    ds = patch_heatmap(model, tokenizer, facts, sites={"subj": {"label": "Subj.", "component": "resid",
                                                                  "positions": "subject"}})
    ds["js_mean"].to_pandas()
    trace(model, tokenizer, facts[0])["p_target_answer"].sel(component="resid").to_pandas()
"""

from . import activations, layouts, models
from . import config as cfg
from .aggregate import merge_sites
from .config import resolve_layers
from .encoding import token_table
from .errors import UserError
from .facts import check_facts
from .interventions import Intervention, from_run
from .job import PatchJob, touched_layers
from .pairs import make_pairs
from .patching import run_patch_job
from .provenance import package_versions
from .sites import Site
from .traces import TraceSettings, trace_fact

DEFAULT_SITES = {
    "subj": {"label": "Subj.", "component": "resid", "positions": "subject"},
    "attn": {"label": "Attn.", "component": "attn", "positions": "last"},
    "last": {"label": "Last.", "component": "resid", "positions": "last"},
}
RUN = "patch_heatmap"  # the name of the run that the arguments make up, for the config's checks


def patch_heatmap(model, tokenizer, facts, sites=None, layers="all", examples=100, seed=0, batch_size=32,
                  js_base=2, known_only=True, intervention="swap", noise_scale=3.0, value="mean", window=1,
                  progress=True, engine="fast", pairing="subject", noise_samples=1):
    """Pair the facts, patch every site at every layer, and return the dataset that the workflow writes
    as divergence.nc (without the file provenance): js (example, site, layer), js_mean, js_ci_low, ...
    `intervention` is a name ("swap", the default, "noise", "ablate", "knockout": with `pairing`,
    `noise_scale`, `noise_samples` or `value` as in a run's config) or an Intervention object with its own
    parameters; `engine` is "fast" (the default) or "reference". The arguments are checked as a run of the
    workflow's config is (config/schema.yaml), and the facts as a dataset file's rows."""
    given = intervention if isinstance(intervention, Intervention) else None
    run = {"layers": layers, "examples": examples, "seed": seed, "batch_size": batch_size, "js_base": js_base,
           "known_only": known_only, "intervention": "swap" if given else intervention, "noise_scale": noise_scale,
           "value": value, "window": window, "engine": engine, "pairing": pairing, "noise_samples": noise_samples}
    # 1. the arguments, checked as a run of the config; the facts, as a dataset file's rows
    run, site_specs = check_arguments(run, DEFAULT_SITES if sites is None else sites)
    facts = check_facts(_as_list(facts), "patch_heatmap: argument facts")
    check_model_and_tokenizer(model, tokenizer)
    sites = [Site.from_config(name, spec) for name, spec in site_specs.items()]
    base = cfg.js_base(run)
    layers = resolve_layers(run["layers"], models.n_layers(model), "patch_heatmap: argument layers")
    intervention = given or from_run(run)
    # 2. the pairs, and the sources the intervention writes in
    pairs = make_pairs(model, tokenizer, facts, run["examples"], run["seed"], run["known_only"],
                       batch_size=run["batch_size"], intervention=intervention)
    extracted = touched_layers(layers, run["window"], models.n_layers(model))
    sources = intervention.sources(pairs, lambda: activations.extract_activations(
        model, pairs, sites, extracted, run["batch_size"], tokenizer.pad_token_id, progress))
    # 3. every site patched, merged as the workflow's divergence stage does
    job = PatchJob(model=model, pairs=pairs, sites=sites, layers=layers, batch_size=run["batch_size"],
                   pad_id=tokenizer.pad_token_id, intervention=intervention, sources=sources, js_base=base,
                   window=run["window"], progress=progress)
    ds = merge_sites(run_patch_job(job, engine=run["engine"]), sites, base, run["seed"])
    ds = ds.merge(token_table(tokenizer, ds, pairs))
    ds.attrs.update({k: v for k, v in pairs.attrs.items()})
    ds.attrs.update({"model": getattr(model.config, "_name_or_path", ""), "js_base": str(run["js_base"])})
    ds.attrs.update({f"version_{k}": v for k, v in package_versions().items()})
    return ds


def trace(model, tokenizer, fact, source=None, facts=None, intervention=None, components=None, window=None,
          noise_scale=None, noise_samples=None, seed=None, batch_size=None, js_base=None, engine=None, index=0,
          progress=True):
    """The token trace of one fact (ROME's causal trace), as the workflow writes it for each fact of a trace
    (results/traces/{trace}/trace.nc, the fact's group; without the file provenance): js, p_target_answer,
    ... (component, token, layer), p_answer_unpatched, p_answer_corrupted. `fact` (and `source`, the fact
    patched in by intervention="swap") is a dict with subject, prompt, attribute (and id); `facts`: the facts
    whose subject embeddings' std scales the noise (the workflow: the trace's dataset; default: the fact and
    its source); `index`: the fact's number in a trace's list (the noise of fact i is that of example i of a
    run with the same seed). The other arguments are a trace's config settings, checked by the schema, which
    also gives the default of each left None (noise, resid/mlp/attn, windows 1/10/10, 10 noise samples, ...)."""
    # 1. the arguments, checked as a trace of the config; the facts, as a dataset file's rows
    fact = check_facts([fact], "trace: argument fact")[0]
    source = None if source is None else check_facts([source], "trace: argument source")[0]
    noise_facts = [fact] + ([source] if source else []) if facts is None else check_facts(
        _as_list(facts), "trace: argument facts")
    item = {"id": "fact", **{k: fact[k] for k in ("subject", "prompt", "attribute")}}
    if source is not None:
        item["source"] = {k: source[k] for k in ("subject", "prompt", "attribute")}
    given = {"intervention": intervention, "components": components, "window": window, "noise_scale": noise_scale,
             "noise_samples": noise_samples, "seed": seed, "batch_size": batch_size, "js_base": js_base,
             "engine": engine}
    spec = {"model": "model", "facts": [item], **{k: _plain(v) for k, v in given.items() if v is not None}}
    try:
        cfg.validate_trace(spec)
    except cfg.ConfigError as e:
        where = {"facts.0": "fact", "facts.0.source": "source"}.get(".".join(e.path), ".".join(e.path))
        raise UserError(f"trace: argument {where or '(the arguments together)'}: {e.detail}") from None
    check_model_and_tokenizer(model, tokenizer, "trace")
    # 2. the trace, as the workflow's trace stage computes each fact's
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise UserError(f"trace: argument index: {index!r} is not a fact's number (0, 1, ...)")
    ds = trace_fact(model, tokenizer, fact, source, TraceSettings.from_spec(spec), noise_facts, index, progress)
    ds.attrs.update({"model": getattr(model.config, "_name_or_path", "")})
    ds.attrs.update({f"version_{k}": v for k, v in package_versions().items()})
    return ds


def check_arguments(run, sites):
    """The arguments as a one-run config, validated by the workflow's schema and cross-reference checks
    (defaults filled in); a mistake is a UserError naming the argument. Returns (run, sites) as checked."""
    if isinstance(sites, dict):
        sites = {name: _site_spec(spec) for name, spec in sites.items()}
    run = {key: _plain(value) for key, value in run.items()}
    config = {"models": {"model": {"path": "(in memory)"}}, "datasets": {"facts": {"path": "(in memory)"}},
              "sites": sites, "runs": {RUN: {"model": "model", "dataset": "facts",
                                             "sites": list(sites) if isinstance(sites, dict) else [], **run}}}
    try:
        cfg.validate(config)
    except cfg.ConfigError as e:
        raise UserError(f"patch_heatmap: argument {_argument(e.path)}: {e.detail}") from None
    return config["runs"][RUN], config["sites"]


def check_model_and_tokenizer(model, tokenizer, function="patch_heatmap"):
    if not hasattr(model, "config") or not callable(model):
        raise UserError(f"{function}: argument model: expected a loaded model (e.g. from models.load), not "
                        f"{type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "is_fast"):
        raise UserError(f"{function}: argument tokenizer: expected a loaded tokenizer (e.g. from models.load), "
                        f"not {type(tokenizer).__name__}")
    layouts.check_supported(getattr(model.config, "model_type", None))
    models.check_fast_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", "") or "the tokenizer given")
    if tokenizer.pad_token_id is None:
        raise UserError(f"{function}: the tokenizer has no pad token; set tokenizer.pad_token = "
                        "tokenizer.eos_token first (models.load does this)")


def _argument(path):
    """`layers.1` for the run's keys, `sites.subj.component` for a site, `sites` for the whole mapping."""
    if path[:2] == ("runs", RUN):
        path = path[2:]
    return ".".join(path) or "(the arguments together)"


def _site_spec(spec):
    if isinstance(spec, Site):
        return {"label": spec.label, "component": spec.component, "positions": spec.positions}
    return dict(spec) if isinstance(spec, dict) else spec


def _plain(value):
    """numpy scalars (and lists of them) as Python values, which the schema's types accept."""
    if isinstance(value, (list, tuple, range)) or type(value).__name__ == "ndarray":
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") and type(value).__module__ == "numpy" else value


def _as_list(facts):
    if isinstance(facts, (dict, str, bytes)) or not hasattr(facts, "__iter__"):
        return facts  # refused by check_facts, which names the type
    return list(facts)
