"""One function per workflow stage, named after its rule, from files to files: each takes its paths from
its rule (inputs, outputs, params) and its settings from the config. scripts/<rule>.py calls it inside
patchmap.runtime.reported_errors.

Every rule starts a fresh Python: the stages that need torch and transformers (seconds to import) import
them inside the function, so the jobs that run no model start fast."""

import json
import logging
from pathlib import Path

import xarray as xr

from . import config as cfg
from . import heads, provenance, shards, synthetic, tracefacts
from .facts import check_sha256, download, load_jsonl, read_facts, sha256_file, write_jsonl
from .errors import UserError
from .interventions import from_run
from .loading import load_model, load_tokenizer, read_identity
from .stacking import stacked
from .storage import atomic_path, write_netcdf

log = logging.getLogger("patchmap")


def download_dataset(dataset_name, url, sha256, out):
    """results/datasets/{dataset}.json(l): a url: dataset, its sha256 checked when the config gives one."""
    digest = download(url, out, sha256, f"dataset '{dataset_name}' ({url})")
    log.info("downloaded %s to %s (sha256 %s)", url, out, digest)


def facts(dataset_name, dataset, dataset_path, out):
    """results/datasets/{dataset}/facts.jsonl: the synthetic facts, or the dataset file (`dataset_path`) in
    the project's form. `dataset`: the config's entry."""
    if "synthetic" in dataset:
        rows = synthetic.facts(synthetic.make_world(**dataset["synthetic"]))
    else:
        check_sha256(dataset_path, dataset.get("sha256"), f"dataset '{dataset_name}' ({dataset.get('url') or dataset_path})")
        rows = read_facts(dataset_path)
    if not rows:
        raise UserError(f"dataset '{dataset_name}' has no facts")
    write_jsonl(rows, out)
    log.info("wrote %d facts to %s", len(rows), out)


def train_builtin_model(model_name, model, world, out):
    """results/models/{model}: the shipped weights when the model's spec (`model`: its config entry; `world`:
    its synthetic dataset's) is the one they were trained from (the default), else a model trained here."""
    from .shipped import builtin_settings, install_shipped, shipped_model, training_spec
    world_settings, shape, train = builtin_settings(model, world)
    shipped = shipped_model(training_spec(world_settings, shape, train))
    if shipped is not None:
        sha = install_shipped(shipped, out)
        log.info("%s: the shipped weights (%s, sha256 %s) were trained from this spec; using them", model_name,
                 shipped, sha)
        return
    from .builtin import train_builtin
    summary = train_builtin(out, world_settings, shape, train, name=model_name)
    log.info("trained %s: %d steps, question accuracy %.4f, %.0f s, weights sha256 %s", model_name,
             summary["steps"], summary["question_accuracy"], summary["seconds"], summary["weights_sha256"])


def model_identity(model_name, model, source, out):
    """results/models/{model}.json, made once per model: where it loads from (`source`: a folder, or a hub
    id), a local checkpoint's weights sha256 (and each file's), or a hub model's resolved commit, which
    every load then uses (the model is pinned). `model`: its config entry."""
    from .checkpoints import check_model_source
    check_model_source(source, model.get("revision"), model.get("allow_pickle", False))  # a broken folder stops here
    identity = {"model": model_name, "source": source, "revision": model.get("revision") or ""}
    if Path(source).expanduser().is_dir():
        weights, files = provenance.checkpoint_sha256s(source)
        identity.update(commit="", weights_sha256=weights, files=files)
    else:
        identity.update(commit=provenance.hub_commit(source, model.get("revision")), weights_sha256="", files={})
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(identity, indent=2) + "\n")
    log.info("model %s: %s", model_name, identity["weights_sha256"] or f"commit {identity['commit']}")


def predictions(config, model_name, dataset_name, dtype, device, batch_size, facts_path, identity_path, out):
    """results/predictions/{model}/{dataset}/{dtype}.nc: every fact's top-1 token and answer probability
    under the model, made once for all runs on that model, dataset and dtype (with the `device` and
    `batch_size` of the first of them)."""
    from .predictions import predict_facts
    model, tokenizer = load_model(config["models"][model_name], identity_path, dtype, device)
    ds = predict_facts(model, tokenizer, load_jsonl(facts_path), batch_size)
    identity = read_identity(identity_path)
    ds.attrs.update({"title": f"predictions of model '{model_name}' on dataset '{dataset_name}'",
                     "model": model_name, "model_source": identity["source"],
                     "model_revision": identity["revision"], "model_commit": identity["commit"],
                     "model_weights_sha256": identity["weights_sha256"], "dataset": dataset_name,
                     "facts_sha256": sha256_file(facts_path), "dtype": dtype, "device": device})
    ds.attrs.update({f"version_{k}": v for k, v in provenance.package_versions().items()})
    log.info("predicted %d facts; the model's top-1 token is the answer for %d", ds.sizes["fact"],
             int((ds["top1"] == ds["answer"]).sum()))
    write_netcdf(ds, out)


def pairs(config, run_name, facts_path, predictions_path, identity_path, out):
    """results/{run}/pairs.nc from the facts, the shared predictions and the tokenizer (no model). The
    workflow plans the run's shards from the pairs it holds (the pairs checkpoint)."""
    from .pairs import pairs_from_predictions
    run = config["runs"][run_name]
    tokenizer = load_tokenizer(config["models"][run["model"]], identity_path)
    ds = pairs_from_predictions(tokenizer, load_jsonl(facts_path), xr.load_dataset(predictions_path),
                                run["examples"], run["seed"], run["known_only"], run["missing_subject"],
                                from_run(run))
    ds.attrs["facts_sha256"] = sha256_file(facts_path)
    ds.attrs["model_commit"] = read_identity(identity_path)["commit"]
    write_netcdf(ds, out)
    n_pairs = ds.sizes["example"]
    log.info("%d pairs: %d shards of %d, one patch job each", n_pairs, shards.count(n_pairs, run["shard_size"]),
             run["shard_size"])


def shard_of(config, run_name, pairs_path, shard):
    """The examples of shard number `shard` of a run's pairs. The workflow plans only the shards that the
    pairs fill; any other (a target named by hand) is refused here, before a model loads."""
    ds = xr.load_dataset(pairs_path)
    n_examples, shard_size, shard = ds.sizes["example"], config["runs"][run_name]["shard_size"], int(shard)
    count = shards.count(n_examples, shard_size)
    if shard >= count:
        raise UserError(f"run '{run_name}' has no shard {shard}: its {n_examples} pairs make {count} shards of "
                        f"{shard_size} (0 to {count - 1})")
    start, stop = shards.bounds(n_examples, shard_size, shard)
    return ds.isel(example=slice(start, stop))


def extract_shard(config, run_name, model, tokenizer, shard_pairs):
    """The shard's source activations at every layer that a patch window of the run's layers touches."""
    from . import activations, models
    from .job import touched_layers
    run = config["runs"][run_name]
    n_layers = models.n_layers(model)
    layers = cfg.resolve_layers(run["layers"], n_layers, f"runs.{run_name}.layers")
    return activations.extract_activations(model, shard_pairs, cfg.run_sites(config, run_name),
                                           touched_layers(layers, run["window"], n_layers), run["batch_size"],
                                           tokenizer.pad_token_id)


def load_run_model(config, run_name, identity_path):
    run = config["runs"][run_name]
    return load_model(config["models"][run["model"]], identity_path, run["dtype"], run["device"])


def extract(config, run_name, pairs_path, shard, identity_path, out):
    """Source activations for one shard, at every layer a patch window touches (for an intervention whose
    patch jobs need every shard's activations pooled first: ablate)."""
    shard_pairs = shard_of(config, run_name, pairs_path, shard)
    model, tokenizer = load_run_model(config, run_name, identity_path)
    write_netcdf(extract_shard(config, run_name, model, tokenizer, shard_pairs), out)


def ablation(config, run_name, activation_paths, out):
    """results/{run}/ablation.nc: the values the run's intervention pools from every shard's activations
    (ablate: zero, or the mean)."""
    intervention = from_run(config["runs"][run_name])
    write_netcdf(intervention.pool([xr.load_dataset(p) for p in activation_paths]), out)


def patch(config, run_name, pairs_path, shard, identity_path, out, activations_out=None, ablation_path=None):
    """results/{run}/patch/{shard}.nc: every site of the run on one shard, with one model load. The
    intervention gives the sources it writes in: the shard's source activations, extracted here (and
    written to `activations_out`), the pooled values of `ablation_path`, or none."""
    from . import models
    from .job import PatchJob
    from .encoding import token_table
    from .patching import run_patch_job
    run = config["runs"][run_name]
    # 1. the shard's pairs, the model, the run's layers and sites
    shard_pairs = shard_of(config, run_name, pairs_path, shard)
    model, tokenizer = load_run_model(config, run_name, identity_path)
    layers = cfg.resolve_layers(run["layers"], models.n_layers(model), f"runs.{run_name}.layers")
    sites = cfg.run_sites(config, run_name)
    intervention = from_run(run)

    # 2. the sources the intervention writes in
    def extracted():
        activations = extract_shard(config, run_name, model, tokenizer, shard_pairs)
        if activations_out:
            write_netcdf(activations, activations_out)
        return activations

    pooled = xr.load_dataset(ablation_path) if ablation_path else None
    sources = intervention.sources(shard_pairs, extracted, pooled)
    # 3. every site patched, on the run's engine
    log.info("patching sites %s, shard %s: %d examples x %d layers",
             ", ".join(f"{s.label} ({s.component}@{s.positions})" for s in sites), shard, shard_pairs.sizes["example"],
             len(layers))
    job = PatchJob(model=model, pairs=shard_pairs, sites=sites, layers=layers, batch_size=run["batch_size"],
                   pad_id=tokenizer.pad_token_id, intervention=intervention, sources=sources, js_base=cfg.js_base(run),
                   window=run["window"])
    ds = stack_sites(run_patch_job(job, engine=run["engine"]), sites)
    # 4. the text of every token the results name, so that the file reads without the tokenizer
    write_netcdf(ds.merge(token_table(tokenizer, ds, shard_pairs)), out)


STACKED = ("label", "component", "positions")  # the per-site coordinates of a shard's patch file


def stack_sites(per_site, sites):
    """One shard's per-site results (example x layer each; x head for a head site) as one dataset with a
    `site` dimension (site names); head sites along `head_site` (patchmap.heads); the unpatched target's top
    tokens, the same for every site, once."""
    def stack(group):
        ds = stacked([per_site[s.name].drop_attrs(deep=False) for s in group], "site", join="exact")
        ds = ds.assign_coords(site=[s.name for s in group], label=("site", [s.label for s in group]),
                              component=("site", [s.component for s in group]),
                              positions=("site", [s.positions for s in group]))
        return ds.transpose("example", "site", "layer", ...)

    ds = heads.joined(stack, sites)
    ds.attrs.update({k: per_site[sites[0].name].attrs[k] for k in ("js_base", "window")})
    return ds


def divergence(config, run_name, pairs_path, patch_paths, identity_path, dataset_path, out):
    """Merge every shard into results/{run}/divergence.nc, with summaries and provenance. `dataset_path`:
    the run's dataset file (None for a synthetic dataset)."""
    from .aggregate import merge_sites
    run = config["runs"][run_name]
    sites = cfg.run_sites(config, run_name)
    patched = [xr.load_dataset(p) for p in patch_paths]
    tokens = [ds[["token_text"]] for ds in patched if "token_text" in ds]  # absent from shards made before it
    patched = [ds.drop_vars(["token_text", "token_id"], errors="ignore") for ds in patched]
    per_site = {s.name: [heads.one_site(ds, s, STACKED) for ds in patched] for s in sites}
    ds = merge_sites(per_site, sites, cfg.js_base(run), run["seed"])
    if tokens:
        ds = ds.merge(xr.merge(tokens, join="outer"))
    pairs_ds = xr.load_dataset(pairs_path)
    for var in ("target_prompt", "source_prompt", "target_attribute", "source_attribute", "relation"):
        ds.coords[var] = ("example", pairs_ds[var].values)
    identity = read_identity(identity_path)
    dataset = config["datasets"][run["dataset"]]
    ds.attrs.update(provenance.attributes(
        config, run_name, model_source=identity["source"], weights_sha256=identity["weights_sha256"],
        dataset_sha256=sha256_file(dataset_path) if dataset_path else pairs_ds.attrs["facts_sha256"],
        dataset_source=dataset.get("url") or dataset.get("path") or "synthetic (built in)",
        facts_sha256=pairs_ds.attrs["facts_sha256"]))
    ds.attrs["model_commit"] = identity["commit"]
    ds.attrs.update({k: v for k, v in pairs_ds.attrs.items()
                     if k.startswith("count_") or k in ("pairing", shards.SHORTFALL)})
    write_netcdf(ds, out)


def heatmap(divergence_path, png, pdf):
    from .plot import save_heatmap
    ds = xr.load_dataset(divergence_path)
    save_heatmap(ds, png, pdf, title=None)


def lines(divergence_path, png, pdf):
    from .plot import save_lines
    ds = xr.load_dataset(divergence_path)
    save_lines(ds, png, pdf, title=f"{ds.attrs['run']}: {ds.attrs['model']}, {provenance.method(ds.attrs)}")


def explorer(divergence_path, pairs_path, out):
    """results/{run}/explorer.html: the run's numbers in one self-contained page."""
    from .explorer import write_explorer
    write_explorer(divergence_path, pairs_path, out)


def figure(config, figure_name, divergence_paths, png, pdf):
    from .plot import save_grid
    spec = config["figures"][figure_name]
    datasets = [xr.load_dataset(p) for p in divergence_paths]
    titles = [f"{ds.attrs['run']}: {ds.attrs['model']}, {provenance.method(ds.attrs)}" for ds in datasets]
    save_grid(datasets, titles, png, pdf, spec["columns"])


def trace(config, trace_name, facts_path, identity_path, out):
    """results/traces/{trace}/trace.nc: the token trace of every fact of a trace (patchmap.traces), with one
    model load: a netCDF group per fact (named after it), the provenance in the root group. `facts_path`:
    the facts of the trace's dataset (None for a trace without one)."""
    from tqdm.auto import tqdm

    from .traces import TraceSettings, trace_fact
    spec = config["traces"][trace_name]
    dataset = load_jsonl(facts_path) if facts_path else []
    facts = [tracefacts.fact_and_source(spec, name, dataset, f"trace '{trace_name}'")
             for name in tracefacts.names(spec)]  # a fact id not in the dataset stops here, before the model loads
    model, tokenizer = load_model(config["models"][spec["model"]], identity_path, spec["dtype"], spec["device"])
    log.info("tracing %d facts with %s: %s", len(facts), spec["intervention"],
             ", ".join(f"{c} (window {spec['window'][c]})" for c in spec["components"]))
    groups = {}
    for name, (index, fact, source) in zip(tqdm(tracefacts.names(spec), desc="trace", unit="fact"), facts):
        groups[name] = trace_fact(model, tokenizer, fact, source, TraceSettings.from_spec(spec),
                                  noise_facts=dataset or tracefacts.inline_facts(spec), index=index, progress=False)
    root = xr.Dataset(attrs=provenance.trace_attributes(config, trace_name, read_identity(identity_path),
                                                        sha256_file(facts_path) if facts_path else ""))
    write_netcdf(xr.DataTree.from_dict({"/": root, **{f"/{name}": ds for name, ds in groups.items()}}), out)


def trace_figure(trace_path, fact_name, png, pdf):
    """One traced fact's figure in ROME's layout, from its group of the trace's file."""
    from .plot_trace import save_trace
    save_trace(xr.load_dataset(trace_path, group=fact_name), png, pdf)
