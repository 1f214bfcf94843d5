"""What a result was made from: model, data, config and software, as netCDF attributes."""

import hashlib
import platform
from importlib.metadata import PackageNotFoundError, version

from pathlib import Path

import yaml

from .errors import UserError
from .interventions import from_run

PACKAGES = ("patchmap", "torch", "transformers", "tokenizers", "numpy", "xarray", "netCDF4", "scipy", "snakemake")


def package_versions():
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return found


def method(attrs):
    """A short description of a result's intervention, e.g. 'ablate (mean), window 3' or 'noise, window 10,
    10 noise samples'."""
    text = attrs["intervention"]
    if attrs.get("ablation_value"):
        text += f" ({attrs['ablation_value']})"
    if int(attrs.get("window", 1)) > 1:
        text += f", window {attrs['window']}"
    if int(attrs.get("noise_samples", 1)) > 1:
        text += f", {attrs['noise_samples']} noise samples"
    return text


def run_config_yaml(config, run_name):
    """The part of the config that one run uses, as YAML: the run, its model, dataset and sites."""
    run = config["runs"][run_name]
    used = {"run": {run_name: run}, "model": {run["model"]: config["models"][run["model"]]},
            "dataset": {run["dataset"]: config["datasets"][run["dataset"]]},
            "sites": {s: config["sites"][s] for s in run["sites"]}}
    return yaml.safe_dump(used, sort_keys=False)


def attributes(config, run_name, model_source, weights_sha256, dataset_sha256, dataset_source,
               facts_sha256):
    run = config["runs"][run_name]
    model = config["models"][run["model"]]
    attrs = {
        "title": f"patchmap run '{run_name}': activation patching, {run['intervention']}",
        "run": run_name,
        "model": run["model"],
        "model_source": model_source,
        "model_revision": model.get("revision") or "",
        "model_weights_sha256": weights_sha256 or "",
        "dataset": run["dataset"],
        "dataset_source": dataset_source,
        "dataset_sha256": dataset_sha256,
        "facts_sha256": facts_sha256,
        "intervention": run["intervention"],
        "window": run["window"],
        **from_run(run).recorded_settings(),
        "js_base": str(run["js_base"]),
        "seed": run["seed"],
        "dtype": run["dtype"],
        "config_yaml": run_config_yaml(config, run_name),
    }
    attrs.update({f"version_{k}": v for k, v in package_versions().items()})
    return attrs


def trace_attributes(config, trace_name, identity, facts_sha256):
    """What a trace's file records besides its own settings: the model (source, weights sha256 or hub commit),
    the dataset and its facts' sha256, the trace's config as YAML, and the package versions."""
    spec = config["traces"][trace_name]
    used = {"trace": {trace_name: spec}, "model": {spec["model"]: config["models"][spec["model"]]}}
    attrs = {"trace": trace_name, "model": spec["model"], "model_source": identity["source"],
             "model_revision": config["models"][spec["model"]].get("revision") or "",
             "model_weights_sha256": identity["weights_sha256"] or "", "model_commit": identity["commit"],
             "dataset": spec.get("dataset", ""), "facts_sha256": facts_sha256, "dtype": spec["dtype"],
             "config_yaml": yaml.safe_dump(used, sort_keys=False)}
    attrs.update({f"version_{k}": v for k, v in package_versions().items()})
    return attrs


def weights_sha256(source):
    """sha256 over the weight files of a local checkpoint (in name order); None for a hub id."""
    return checkpoint_sha256s(source)[0] if Path(source).expanduser().is_dir() else None


def checkpoint_sha256s(folder):
    """(sha256 over the weight files in name order, {file name: sha256} of every file) of a local
    checkpoint folder, each file read once (a 7B model's weights are 13.5 GB)."""
    folder = Path(folder).expanduser()
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    combined, per_file = hashlib.sha256(), {}
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest = hashlib.sha256()
        if f in weights:
            combined.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
                if f in weights:
                    combined.update(chunk)
        per_file[f.name] = digest.hexdigest()
    return combined.hexdigest(), per_file


def hub_commit(repo_id, revision=None):
    """The commit that a hub model's revision (default: main) resolves to now, through the local cache
    when offline; loads then use this commit, so a run does not drift when the repository changes."""
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    try:
        config_file = cached_file(repo_id, "config.json", revision=revision)
    except OSError as error:
        raise UserError(f"could not resolve model '{repo_id}' (revision {revision or 'main'}) on the hub: "
                        f"{str(error).splitlines()[0]}") from None
    commit = extract_commit_hash(config_file, None)
    if not commit:
        raise UserError(f"could not find the commit of model '{repo_id}' (revision {revision or 'main'})")
    return commit
