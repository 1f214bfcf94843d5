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
from . import data, provenance, synthetic
from .errors import UserError
from .storage import write_netcdf

# Every rule starts a fresh Python: the stages that need torch and transformers (seconds to import)
# import them inside the function, so facts, divergence and plotting jobs start fast.

log = logging.getLogger("patchmap")


@contextmanager
def reported_errors(log_path=None):
    """Set up logging to the rule's log file; turn a UserError into one line and exit status 1. Any other
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
        log.error("patchmap: %s", e)
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


def make_facts(config, run_name, out):
    """results/{run}/facts.jsonl: the synthetic facts, or the dataset file in the project's form."""
    name = config["runs"][run_name]["dataset"]
    dataset = config["datasets"][name]
    if "synthetic" in dataset:
        rows = synthetic.facts(synthetic.make_world(**dataset["synthetic"]))
    else:
        path = cfg.dataset_file(config, name)
        data.check_sha256(path, dataset.get("sha256"), f"dataset '{name}' ({dataset.get('url') or path})")
        rows = data.read_facts(path)
    if not rows:
        raise UserError(f"dataset '{config['runs'][run_name]['dataset']}' has no facts")
    data.write_jsonl(rows, out)
    log.info("wrote %d facts to %s", len(rows), out)


def train_model(config, model_name, out):
    from .builtin import train_builtin
    spec = config["models"][model_name]["builtin"]
    world = config["datasets"][spec["dataset"]]["synthetic"]
    shape = {k: spec[k] for k in ("layers", "hidden", "heads", "mlp")}
    summary = train_builtin(out, world, shape, spec["train"])
    log.info("trained %s: %d steps, question accuracy %.4f, %.0f s", model_name, summary["steps"],
             summary["question_accuracy"], summary["seconds"])


def load_run_model(config, run_name):
    from . import models
    run = config["runs"][run_name]
    model_cfg = config["models"][run["model"]]
    return models.load(cfg.model_dir(config, run["model"]), revision=model_cfg.get("revision"),
                       dtype=run["dtype"], device=run["device"],
                       trust_remote_code=model_cfg.get("trust_remote_code", False),
                       allow_pickle=model_cfg.get("allow_pickle", False),
                       device_map=model_cfg.get("device_map"), max_memory=model_cfg.get("max_memory"))


def make_pairs_file(config, run_name, facts_path, out):
    from .pairs import make_pairs
    run = config["runs"][run_name]
    model, tokenizer = load_run_model(config, run_name)
    facts = data.load_jsonl(facts_path)
    ds = make_pairs(model, tokenizer, facts, run["examples"], run["seed"], run["known_only"],
                    run["missing_subject"], run["batch_size"], run["intervention"], run["noise_scale"])
    ds.attrs["facts_sha256"] = data.sha256_file(facts_path)
    ds.attrs["model_commit"] = getattr(model.config, "_commit_hash", None) or ""
    write_netcdf(ds, out)


def _shard(pairs_path, run, shard):
    from .pairs import shard_bounds
    pairs = xr.load_dataset(pairs_path)
    a, b = shard_bounds(pairs.sizes["example"], run["shard_size"], int(shard))
    return pairs.isel(example=slice(a, b))


def extract(config, run_name, pairs_path, shard, out):
    """Source activations for one shard, at every layer that a patch window of the run's layers touches."""
    from . import models, patching
    from .engine import window_layers
    run = config["runs"][run_name]
    model, tokenizer = load_run_model(config, run_name)
    n_layers = models.n_layers(model)
    layers = cfg.resolve_layers(run["layers"], n_layers, f"runs.{run_name}.layers")
    layers = sorted({w for layer in layers for w in window_layers(layer, run["window"], n_layers)})
    pairs = _shard(pairs_path, run, shard)
    ds = patching.extract_activations(model, pairs, cfg.run_sites(config, run_name), layers,
                                      run["batch_size"], tokenizer.pad_token_id)
    write_netcdf(ds, out)


def ablation(config, run_name, activation_paths, out):
    """results/{run}/ablation.nc: the ablate intervention's values (zero, or the mean over all shards)."""
    from . import patching
    run = config["runs"][run_name]
    ds = patching.ablation_values([xr.load_dataset(p) for p in activation_paths], cfg.run_sites(config, run_name),
                                  run["value"])
    write_netcdf(ds, out)


def patch(config, run_name, site_name, pairs_path, acts_path, shard, out, ablation_path=None):
    from . import models, patching
    run = config["runs"][run_name]
    model, tokenizer = load_run_model(config, run_name)
    layers = cfg.resolve_layers(run["layers"], models.n_layers(model), f"runs.{run_name}.layers")
    site = next(s for s in cfg.run_sites(config, run_name) if s.name == site_name)
    pairs = _shard(pairs_path, run, shard)
    if run["intervention"] == "ablate":
        acts = patching.broadcast_ablation(xr.load_dataset(ablation_path), pairs)
    else:
        acts = xr.load_dataset(acts_path)
    log.info("patching site %s (%s@%s), shard %s: %d examples x %d layers", site.label, site.component,
             site.positions, shard, pairs.sizes["example"], len(layers))
    ds = patching.patch(model, pairs, acts, [site], layers, run["batch_size"], tokenizer.pad_token_id,
                        cfg.js_base(run), engine=run["engine"], window=run["window"])[site.name]
    write_netcdf(ds, out)


def divergence(config, run_name, pairs_path, patch_paths, out):
    """Merge every site's shards into results/{run}/divergence.nc, with summaries and provenance."""
    from .aggregate import merge_sites
    run = config["runs"][run_name]
    sites = cfg.run_sites(config, run_name)
    per_site = {s.name: [xr.load_dataset(p) for p in patch_paths[s.name]] for s in sites}
    ds = merge_sites(per_site, sites, cfg.js_base(run), run["seed"])
    pairs = xr.load_dataset(pairs_path)
    for var in ("target_prompt", "source_prompt", "target_attribute", "source_attribute", "relation"):
        ds.coords[var] = ("example", pairs[var].values)
    source = cfg.model_dir(config, run["model"])
    dataset = config["datasets"][run["dataset"]]
    dataset_file = cfg.dataset_file(config, run["dataset"])
    ds.attrs.update(provenance.attributes(
        config, run_name, model_source=source, weights_sha256=provenance.weights_sha256(source),
        dataset_sha256=data.sha256_file(dataset_file) if dataset_file else pairs.attrs["facts_sha256"],
        dataset_source=dataset.get("url") or dataset.get("path") or "synthetic (built in)",
        facts_sha256=pairs.attrs["facts_sha256"]))
    ds.attrs["model_commit"] = pairs.attrs.get("model_commit", "")
    ds.attrs.update({k: v for k, v in pairs.attrs.items() if k.startswith("count_")})
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
