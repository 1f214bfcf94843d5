"""One function per workflow stage, from files to files. Rules call these through scripts/."""

import json
import logging
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import xarray as xr

from . import config as cfg
from . import data, provenance, synthetic
from .errors import UserError
from .storage import atomic_path, write_netcdf

# Every rule starts a fresh Python: the stages that need torch and transformers (seconds to import)
# import them inside the function, so facts, divergence and plotting jobs start fast.

log = logging.getLogger("patchmap")


@contextmanager
def reported_errors(log_path=None):
    """Set up logging to the rule's log file; turn a UserError into one line (in the log file if there is
    one, else on the terminal) and exit status 1. Any other
    exception is a bug: its traceback goes into the log file (where cluster users look, and which
    Snakemake shows after a failed job), and the terminal gets one line pointing there; without a log
    file the exception propagates as usual."""
    terminal = logging.StreamHandler(sys.stderr)
    terminal.addFilter(lambda record: not getattr(record, "log_file_only", False))
    handlers = [terminal]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers,
                        force=True)
    log_where()
    try:
        yield
    except UserError as e:
        # with a log file the line goes there only: Snakemake shows a failed job's log on the terminal
        # (show-failed-logs, profiles/default), so the terminal gets it once
        log.error("patchmap: %s", e, extra={"log_file_only": bool(log_path)})
        sys.exit(1)
    except Exception as e:
        if not log_path:
            raise
        log.exception("the job failed with an unexpected error (a bug: please report it with this log)",
                      extra={"log_file_only": True})
        first_line = (str(e).strip().splitlines() or [""])[0]
        print(f"the job failed with an unexpected error, {type(e).__name__}: {first_line}; the traceback is in "
              f"{log_path}", file=sys.stderr)
        sys.exit(1)


def download_dataset(config, dataset_name, out):
    dataset = config["datasets"][dataset_name]
    digest = data.download(dataset["url"], out, dataset.get("sha256"), f"dataset '{dataset_name}' ({dataset['url']})")
    log.info("downloaded %s to %s (sha256 %s)", dataset["url"], out, digest)


def log_where():
    """One line naming the host, the SLURM job and the GPUs the job was given (CUDA_VISIBLE_DEVICES)."""
    env = os.environ
    slurm = f"SLURM job {env['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in env else "no SLURM job"
    log.info("host %s, %s, CUDA_VISIBLE_DEVICES=%s", platform.node(), slurm,
             env.get("CUDA_VISIBLE_DEVICES", "(unset)"))


def make_facts(config, dataset_name, out):
    """results/datasets/{dataset}/facts.jsonl: the synthetic facts, or the dataset file in the project's form."""
    dataset = config["datasets"][dataset_name]
    if "synthetic" in dataset:
        rows = synthetic.facts(synthetic.make_world(**dataset["synthetic"]))
    else:
        path = cfg.dataset_file(config, dataset_name)
        data.check_sha256(path, dataset.get("sha256"), f"dataset '{dataset_name}' ({dataset.get('url') or path})")
        rows = data.read_facts(path)
    if not rows:
        raise UserError(f"dataset '{dataset_name}' has no facts")
    data.write_jsonl(rows, out)
    log.info("wrote %d facts to %s", len(rows), out)


def train_model(config, model_name, out):
    """results/models/{model}: the shipped weights when the config asks for the spec they were trained
    from (the default), else a model trained here."""
    from . import builtin
    world, shape, train = builtin.settings_from_config(config, model_name)
    shipped = builtin.shipped_model(builtin.training_spec(world, shape, train))
    if shipped is not None:
        sha = builtin.install_shipped(shipped, out)
        log.info("%s: the shipped weights (%s, sha256 %s) were trained from this spec; using them", model_name,
                 shipped, sha)
        return
    summary = builtin.train_builtin(out, world, shape, train, name=model_name)
    log.info("trained %s: %d steps, question accuracy %.4f, %.0f s, weights sha256 %s", model_name,
             summary["steps"], summary["question_accuracy"], summary["seconds"], summary["weights_sha256"])


def model_identity(config, model_name, out):
    """results/models/{model}.json, made once per model: a local checkpoint's weights sha256 (and each
    file's), or a hub model's resolved commit, which every load then uses (the model is pinned)."""
    from .checkpoints import check_model_source
    spec = config["models"][model_name]
    source = cfg.model_dir(config, model_name)
    check_model_source(source, spec.get("revision"), spec.get("allow_pickle", False))  # a broken folder stops here
    identity = {"model": model_name, "source": source, "revision": spec.get("revision") or ""}
    if Path(source).expanduser().is_dir():
        weights, files = provenance.checkpoint_sha256s(source)
        identity.update(commit="", weights_sha256=weights, files=files)
    else:
        identity.update(commit=provenance.hub_commit(source, spec.get("revision")), weights_sha256="", files={})
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(identity, indent=2) + "\n")
    log.info("model %s: %s", model_name, identity["weights_sha256"] or f"commit {identity['commit']}")


def read_identity(identity_path):
    return json.loads(Path(identity_path).read_text())


def pinned_revision(spec, identity_path):
    """The hub commit recorded by model_identity (the model is pinned to it), else the config's revision."""
    commit = read_identity(identity_path)["commit"] if identity_path else ""
    return commit or spec.get("revision")


def load_model(config, model_name, dtype, device, identity_path=None):
    """The model (at its recorded hub commit, if any) and tokenizer; logs the one `loaded model` line
    per job that the README's count of model loads refers to."""
    from . import models
    spec = config["models"][model_name]
    source = cfg.model_dir(config, model_name)
    started = time.perf_counter()
    model, tokenizer = models.load(source, revision=pinned_revision(spec, identity_path),
                                   dtype=dtype, device=device, trust_remote_code=spec.get("trust_remote_code", False),
                                   allow_pickle=spec.get("allow_pickle", False), device_map=spec.get("device_map"),
                                   max_memory=spec.get("max_memory"))
    log.info("loaded model %s in %.1f s", source, time.perf_counter() - started)
    return model, tokenizer


def load_run_model(config, run_name, identity_path=None):
    run = config["runs"][run_name]
    return load_model(config, run["model"], run["dtype"], run["device"], identity_path)


def load_run_tokenizer(config, run_name, identity_path):
    from . import models
    run = config["runs"][run_name]
    spec = config["models"][run["model"]]
    return models.load_tokenizer(cfg.model_dir(config, run["model"]),
                                 pinned_revision(spec, identity_path),
                                 spec.get("trust_remote_code", False))


def predictions(config, model_name, dataset_name, dtype, facts_path, identity_path, out):
    """results/predictions/{model}/{dataset}/{dtype}.nc: every fact's top-1 token and answer probability
    under the model, made once for all runs on that model, dataset and dtype."""
    from .pairs import predict_facts
    run = config["runs"][cfg.predicting_run(config, model_name, dataset_name, dtype)]
    model, tokenizer = load_model(config, model_name, dtype, run["device"], identity_path)
    ds = predict_facts(model, tokenizer, data.load_jsonl(facts_path), run["batch_size"])
    identity = read_identity(identity_path)
    ds.attrs.update({"title": f"predictions of model '{model_name}' on dataset '{dataset_name}'",
                     "model": model_name, "model_source": identity["source"],
                     "model_revision": identity["revision"], "model_commit": identity["commit"],
                     "model_weights_sha256": identity["weights_sha256"], "dataset": dataset_name,
                     "facts_sha256": data.sha256_file(facts_path), "dtype": dtype, "device": run["device"]})
    ds.attrs.update({f"version_{k}": v for k, v in provenance.package_versions().items()})
    log.info("predicted %d facts; the model's top-1 token is the answer for %d", ds.sizes["fact"],
             int((ds["top1"] == ds["answer"]).sum()))
    write_netcdf(ds, out)


def make_pairs_file(config, run_name, facts_path, predictions_path, identity_path, out):
    """results/{run}/pairs.nc from the facts, the shared predictions and the tokenizer (no model)."""
    from .pairs import pairs_from_predictions
    run = config["runs"][run_name]
    tokenizer = load_run_tokenizer(config, run_name, identity_path)
    facts = data.load_jsonl(facts_path)
    ds = pairs_from_predictions(tokenizer, facts, xr.load_dataset(predictions_path), run["examples"], run["seed"],
                                run["known_only"], run["missing_subject"], run["intervention"], run["noise_scale"],
                                pairing=run["pairing"])
    ds.attrs["facts_sha256"] = data.sha256_file(facts_path)
    ds.attrs["model_commit"] = read_identity(identity_path)["commit"]
    write_netcdf(ds, out)


def _shard(pairs_path, run, shard):
    from .pairs import shard_bounds
    pairs = xr.load_dataset(pairs_path)
    a, b = shard_bounds(pairs.sizes["example"], run["shard_size"], int(shard))
    return pairs.isel(example=slice(a, b))


def extract_shard(config, run_name, model, tokenizer, pairs):
    """The shard's source activations at every layer that a patch window of the run's layers touches."""
    from . import activations, models
    from .job import touched_layers
    run = config["runs"][run_name]
    n_layers = models.n_layers(model)
    layers = cfg.resolve_layers(run["layers"], n_layers, f"runs.{run_name}.layers")
    return activations.extract_activations(model, pairs, cfg.run_sites(config, run_name),
                                           touched_layers(layers, run["window"], n_layers), run["batch_size"],
                                           tokenizer.pad_token_id)


def extract(config, run_name, pairs_path, shard, identity_path, out):
    """Source activations for one shard, at every layer a patch window touches (the ablate intervention,
    whose patch jobs need the mean over all shards first)."""
    model, tokenizer = load_run_model(config, run_name, identity_path)
    pairs = _shard(pairs_path, config["runs"][run_name], shard)
    write_netcdf(extract_shard(config, run_name, model, tokenizer, pairs), out)


def ablation(config, run_name, activation_paths, out):
    """results/{run}/ablation.nc: the ablate intervention's values (zero, or the mean over all shards)."""
    from . import activations
    run = config["runs"][run_name]
    ds = activations.ablation_values([xr.load_dataset(p) for p in activation_paths], cfg.run_sites(config, run_name),
                                     run["value"])
    write_netcdf(ds, out)


def patch(config, run_name, pairs_path, shard, identity_path, out, activations_out=None, ablation_path=None):
    """results/{run}/patch/{shard}.nc: every site of the run on one shard, with one model load. For swap
    and noise the shard's source activations are extracted first (and written to `activations_out`);
    ablate patches in the ablation values, knockout needs no activations."""
    from . import activations, interventions, models, patching
    from .job import PatchJob
    run = config["runs"][run_name]
    model, tokenizer = load_run_model(config, run_name, identity_path)
    layers = cfg.resolve_layers(run["layers"], models.n_layers(model), f"runs.{run_name}.layers")
    sites = cfg.run_sites(config, run_name)
    pairs = _shard(pairs_path, run, shard)
    intervention = interventions.named(run["intervention"])
    sources = None
    if intervention.pooled:
        sources = activations.broadcast_ablation(xr.load_dataset(ablation_path), pairs)
    elif intervention.writes_sources:
        sources = extract_shard(config, run_name, model, tokenizer, pairs)
        write_netcdf(sources, activations_out)
    log.info("patching sites %s, shard %s: %d examples x %d layers",
             ", ".join(f"{s.label} ({s.component}@{s.positions})" for s in sites), shard, pairs.sizes["example"],
             len(layers))
    job = PatchJob(model=model, pairs=pairs, sites=sites, layers=layers, batch_size=run["batch_size"],
                   pad_id=tokenizer.pad_token_id, sources=sources, js_base=cfg.js_base(run), window=run["window"])
    write_netcdf(stack_sites(patching.patch(job, engine=run["engine"]), sites), out)


def stack_sites(per_site, sites):
    """One shard's per-site metrics (example x layer each) as one dataset with a `site` dimension (site names)."""
    ds = xr.concat([per_site[s.name].drop_attrs(deep=False) for s in sites], dim="site", join="exact")
    ds = ds.assign_coords(site=[s.name for s in sites], label=("site", [s.label for s in sites]),
                          component=("site", [s.component for s in sites]),
                          positions=("site", [s.positions for s in sites])).transpose("example", "site", "layer")
    ds.attrs.update({k: per_site[sites[0].name].attrs[k] for k in ("js_base", "window")})
    return ds


def divergence(config, run_name, pairs_path, patch_paths, identity_path, out):
    """Merge every shard into results/{run}/divergence.nc, with summaries and provenance."""
    from .aggregate import merge_sites
    run = config["runs"][run_name]
    sites = cfg.run_sites(config, run_name)
    shards = [xr.load_dataset(p) for p in patch_paths]
    per_site = {s.name: [ds.drop_vars(["label", "component", "positions"]).sel(site=s.name, drop=True)
                         for ds in shards] for s in sites}
    ds = merge_sites(per_site, sites, cfg.js_base(run), run["seed"])
    pairs = xr.load_dataset(pairs_path)
    for var in ("target_prompt", "source_prompt", "target_attribute", "source_attribute", "relation"):
        ds.coords[var] = ("example", pairs[var].values)
    identity = read_identity(identity_path)
    dataset = config["datasets"][run["dataset"]]
    dataset_file = cfg.dataset_file(config, run["dataset"])
    ds.attrs.update(provenance.attributes(
        config, run_name, model_source=identity["source"], weights_sha256=identity["weights_sha256"],
        dataset_sha256=data.sha256_file(dataset_file) if dataset_file else pairs.attrs["facts_sha256"],
        dataset_source=dataset.get("url") or dataset.get("path") or "synthetic (built in)",
        facts_sha256=pairs.attrs["facts_sha256"]))
    ds.attrs["model_commit"] = identity["commit"]
    ds.attrs.update({k: v for k, v in pairs.attrs.items() if k.startswith("count_") or k == "pairing"})
    write_netcdf(ds, out)


def heatmap(divergence_path, png, pdf):
    from .plot import save_heatmap
    ds = xr.load_dataset(divergence_path)
    save_heatmap(ds, png, pdf, title=None)


def lines(divergence_path, png, pdf):
    from .plot import save_lines
    ds = xr.load_dataset(divergence_path)
    save_lines(ds, png, pdf, title=f"{ds.attrs['run']}: {ds.attrs['model']}, {provenance.method(ds.attrs)}")


def figure(config, figure_name, divergence_paths, png, pdf):
    from .plot import save_grid
    spec = config["figures"][figure_name]
    datasets = [xr.load_dataset(p) for p in divergence_paths]
    titles = [f"{ds.attrs['run']}: {ds.attrs['model']}, {provenance.method(ds.attrs)}" for ds in datasets]
    save_grid(datasets, titles, png, pdf, spec["columns"])
