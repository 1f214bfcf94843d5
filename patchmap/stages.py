"""One function per workflow stage, from files to files. Rules call these through scripts/."""

import json
import logging
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

import xarray as xr

from . import config as cfg
from . import data, models, patching, provenance, synthetic
from .aggregate import merge_sites
from .errors import UserError
from .pairs import make_pairs, shard_bounds
from .plot import save_heatmap
from .storage import write_netcdf

log = logging.getLogger("patchmap")


@contextmanager
def reported_errors(log_path=None):
    """Set up logging to the rule's log file; turn a UserError into one line and exit status 1."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers,
                        force=True)
    log_where()
    try:
        yield
    except UserError as e:
        log.error("patchmap: %s", e)
        sys.exit(1)


def log_where():
    """One line naming the host, the SLURM job and the GPUs the job was given (CUDA_VISIBLE_DEVICES)."""
    env = os.environ
    slurm = f"SLURM job {env['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in env else "no SLURM job"
    log.info("host %s, %s, CUDA_VISIBLE_DEVICES=%s", platform.node(), slurm,
             env.get("CUDA_VISIBLE_DEVICES", "(unset)"))


def make_facts(config, run_name, out):
    """results/{run}/facts.jsonl: the synthetic facts, or the dataset file in the project's form."""
    dataset = config["datasets"][config["runs"][run_name]["dataset"]]
    if "synthetic" in dataset:
        rows = synthetic.facts(synthetic.make_world(**dataset["synthetic"]))
    else:
        rows = data.read_facts(dataset["path"])
    if not rows:
        raise UserError(f"dataset '{config['runs'][run_name]['dataset']}' has no facts")
    data.write_jsonl(rows, out)
    log.info("wrote %d facts to %s", len(rows), out)


def train_model(config, model_name, out):
    spec = config["models"][model_name]["builtin"]
    world = config["datasets"][spec["dataset"]]["synthetic"]
    shape = {k: spec[k] for k in ("layers", "hidden", "heads", "mlp")}
    summary = models_train(out, world, shape, spec["train"])
    log.info("trained %s: %d steps, question accuracy %.4f, %.0f s", model_name, summary["steps"],
             summary["question_accuracy"], summary["seconds"])


def models_train(out, world, shape, train):
    from .builtin import train_builtin  # imported here: only this stage needs it
    return train_builtin(out, world, shape, train)


def load_run_model(config, run_name):
    run = config["runs"][run_name]
    model_cfg = config["models"][run["model"]]
    return models.load(cfg.model_dir(config, run["model"]), revision=model_cfg.get("revision"),
                       dtype=run["dtype"], device=run["device"],
                       trust_remote_code=model_cfg.get("trust_remote_code", False))


def make_pairs_file(config, run_name, facts_path, out):
    run = config["runs"][run_name]
    model, tokenizer = load_run_model(config, run_name)
    facts = data.load_jsonl(facts_path)
    ds = make_pairs(model, tokenizer, facts, run["examples"], run["seed"], run["known_only"],
                    run["missing_subject"], run["batch_size"], run["intervention"])
    ds.attrs["dataset_sha256"] = data.sha256_file(facts_path)
    write_netcdf(ds, out)


def _shard(pairs_path, run, shard):
    pairs = xr.load_dataset(pairs_path)
    a, b = shard_bounds(pairs.sizes["example"], run["shard_size"], int(shard))
    return pairs.isel(example=slice(a, b))


def extract(config, run_name, pairs_path, shard, out):
    run = config["runs"][run_name]
    model, tokenizer = load_run_model(config, run_name)
    layers = cfg.resolve_layers(run["layers"], models.n_layers(model), f"runs.{run_name}.layers")
    pairs = _shard(pairs_path, run, shard)
    ds = patching.extract_activations(model, pairs, cfg.run_sites(config, run_name), layers,
                                      run["batch_size"], tokenizer.pad_token_id)
    write_netcdf(ds, out)


def patch(config, run_name, site_name, pairs_path, acts_path, shard, out):
    run = config["runs"][run_name]
    model, tokenizer = load_run_model(config, run_name)
    layers = cfg.resolve_layers(run["layers"], models.n_layers(model), f"runs.{run_name}.layers")
    site = next(s for s in cfg.run_sites(config, run_name) if s.name == site_name)
    pairs = _shard(pairs_path, run, shard)
    acts = xr.load_dataset(acts_path)
    ds = patching.patch_site(model, pairs, acts, site, layers, run["batch_size"], tokenizer.pad_token_id,
                             cfg.js_base(run))
    write_netcdf(ds, out)


def divergence(config, run_name, pairs_path, patch_paths, out):
    """Merge every site's shards into results/{run}/divergence.nc, with summaries and provenance."""
    run = config["runs"][run_name]
    sites = cfg.run_sites(config, run_name)
    per_site = {s.name: [xr.load_dataset(p) for p in patch_paths[s.name]] for s in sites}
    ds = merge_sites(per_site, sites, cfg.js_base(run), run["seed"])
    pairs = xr.load_dataset(pairs_path)
    for var in ("target_prompt", "source_prompt", "target_attribute", "source_attribute", "relation"):
        ds.coords[var] = ("example", pairs[var].values)
    source = cfg.model_dir(config, run["model"])
    dataset = config["datasets"][run["dataset"]]
    ds.attrs.update(provenance.attributes(
        config, run_name, model_source=source, weights_sha256=models.weights_hash(source),
        dataset_sha256=pairs.attrs["dataset_sha256"],
        dataset_source=dataset.get("path", "synthetic (built in)")))
    ds.attrs.update({k: v for k, v in pairs.attrs.items() if k.startswith("count_")})
    write_netcdf(ds, out)


def heatmap(divergence_path, png, pdf):
    ds = xr.load_dataset(divergence_path)
    save_heatmap(ds, png, pdf, title=None)
