# Config validation (schema + cross-references) and the small functions the rules share.
import os
import re
import sys
from pathlib import Path

from patchmap import config as cfg
from patchmap.interventions import named as named_intervention
from patchmap.errors import UserError

try:
    for configfile_path in workflow.configfiles:
        cfg.load_yaml(configfile_path)  # Snakemake's own loader keeps the last of two equal keys: refuse them
    cfg.validate(config)
    cfg.check_dataset_files(config)  # before Snakemake reports a missing input in its own words
except UserError as error:
    sys.exit(f"patchmap: {error}")


# envs/patchmap.yaml installs patchmap from here (`-e ${PATCHMAP_ROOT}`) when --use-conda makes the env.
os.environ.update(PATCHMAP_ROOT=os.path.abspath(workflow.basedir))


wildcard_constraints:
    run="|".join(map(re.escape, config["runs"])),
    model="[A-Za-z0-9][A-Za-z0-9_.-]*",
    shard=r"\d+",
    site="[A-Za-z0-9][A-Za-z0-9_.-]*",
    dataset="[A-Za-z0-9][A-Za-z0-9_.-]*",
    figure="[A-Za-z0-9][A-Za-z0-9_.-]*",


def run_of(wildcards):
    return config["runs"][wildcards.run]


def dataset_input(wildcards):
    """The dataset file the facts come from (downloaded first for a url); nothing if synthetic."""
    path = cfg.dataset_file(config, wildcards.dataset)
    return [path] if path else []


def filled(pattern, **wildcards):
    """One path: a rule's output pattern (rules.<rule>.output) with its wildcards filled in."""
    return expand(pattern, **wildcards)[0]


def facts_file(wildcards):
    return filled(rules.facts.output[0], dataset=run_of(wildcards)["dataset"])


def model_identity(wildcards):
    """results/models/{model}.json (rule model_identity): every job that uses a model depends on it."""
    return cfg.model_identity_file(model_name(wildcards))


def model_files(wildcards):
    """What a model's identity is made from: the trained directory of a built-in model, every file of a
    local checkpoint folder (so replacing them redoes the results), nothing for a hub id (pinned to the
    commit it resolves to when first used)."""
    spec = config["models"][wildcards.model]
    if "builtin" in spec:
        return cfg.model_dir(config, wildcards.model)
    folder = Path(spec["path"]).expanduser()
    if not folder.is_dir():
        return []
    return sorted(str(f) for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def predictions_input(wildcards):
    return cfg.predictions_file(config, wildcards.run)


def runs_where(holds):
    """A wildcard pattern matching exactly the runs whose intervention (patchmap.interventions) `holds`."""
    names = [name for name, run in config["runs"].items() if holds(named_intervention(run["intervention"]))]
    return "|".join(map(re.escape, names)) or "(?!)"


def ablation_input(wildcards):
    """An intervention whose values are pooled over the whole run (ablate) patches them in (rule ablation)."""
    pooled = named_intervention(run_of(wildcards)["intervention"]).pooled
    return filled(rules.ablation.output[0], run=wildcards.run) if pooled else []


def shards(run):
    return range(cfg.shard_count(config["runs"][run]))


def patch_files(wildcards):
    return expand(rules.patch.output.patch, run=wildcards.run, shard=shards(wildcards.run))


# Cluster resources of the jobs that run a model (predictions, extract, patch, train_builtin_model), from the
# model's `resources` block in the config (schema defaults fit the built-in model). Local runs use
# `cpus` as the job's threads (capped by --cores) and `gpu_jobs` against the cap in profiles/default
# (one GPU job at a time), and ignore the rest; profiles/slurm turns them into
# sbatch options (--gpus, --cpus-per-task, --mem, -t). A retry (--retries) asks for more memory and time.
def model_name(wildcards):
    """The model a job runs: its {model} wildcard, or its run's model."""
    return wildcards.model if "model" in wildcards.keys() else run_of(wildcards)["model"]


def job_device(wildcards):
    """The device a job's model runs on: its run's, or for predictions the predicting run's."""
    if "run" in wildcards.keys():
        return run_of(wildcards)["device"]
    return config["runs"][cfg.predicting_run(config, wildcards.model, wildcards.dataset, wildcards.dtype)]["device"]


def model_resources(wildcards):
    return config["models"][model_name(wildcards)]["resources"]


def model_threads(wildcards):
    return model_resources(wildcards)["cpus"]


def model_gpus(wildcards):
    return model_resources(wildcards)["gpus"]


def device_gpus(wildcards):
    """The model's GPUs, or none for a job whose device is cpu (a CPU-only run asks SLURM for no GPU)."""
    return 0 if job_device(wildcards) == "cpu" else model_gpus(wildcards)


def gpu_job(wildcards):
    """1 for a job that runs its model on GPUs: profiles/default lets one such job run at a time
    (resources: gpu_jobs=1), so two models never share a card unasked; CPU runs are not held back."""
    return 0 if job_device(wildcards) == "cpu" else 1


def model_mem_mb(wildcards, attempt):
    return model_resources(wildcards)["mem_mb"] * attempt


def model_runtime(wildcards, attempt):
    return model_resources(wildcards)["runtime"] * attempt
