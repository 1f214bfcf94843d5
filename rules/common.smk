# Config validation (schema + cross-references) and the small functions the rules share.
import os
import re
import sys

from patchmap import config as cfg
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
    """The dataset file a run's facts come from (downloaded first for a url); nothing if synthetic."""
    path = cfg.dataset_file(config, run_of(wildcards)["dataset"])
    return [path] if path else []


def model_input(wildcards):
    """The trained model directory for a built-in model; nothing for a checkpoint given by path."""
    name = run_of(wildcards)["model"]
    return cfg.model_dir(config, name) if "builtin" in config["models"][name] else []


def ablation_input(wildcards):
    """The ablate intervention patches in values computed over the whole run (rule ablation)."""
    return f"results/{wildcards.run}/ablation.nc" if run_of(wildcards)["intervention"] == "ablate" else []


def shards(run):
    return range(cfg.shard_count(config["runs"][run]))


def patch_files(wildcards):
    return {
        site: expand("results/{run}/patch/{site}/{shard}.nc", run=wildcards.run, site=site, shard=shards(wildcards.run))
        for site in run_of(wildcards)["sites"]
    }


# Cluster resources of the jobs that run a model (pairs, extract, patch, train_builtin_model), from the
# model's `resources` block in the config (schema defaults fit the built-in model). Local runs use
# `cpus` as the job's threads (capped by --cores) and ignore the rest; profiles/slurm turns them into
# sbatch options (--gpus, --cpus-per-task, --mem, -t). A retry (--retries) asks for more memory and time.
def model_name(wildcards):
    """The model a job runs: its {model} wildcard, or its run's model."""
    return wildcards.model if "model" in wildcards.keys() else run_of(wildcards)["model"]


def model_resources(wildcards):
    return config["models"][model_name(wildcards)]["resources"]


def model_threads(wildcards):
    return model_resources(wildcards)["cpus"]


def model_gpus(wildcards):
    return model_resources(wildcards)["gpus"]


def model_mem_mb(wildcards, attempt):
    return model_resources(wildcards)["mem_mb"] * attempt


def model_runtime(wildcards, attempt):
    return model_resources(wildcards)["runtime"] * attempt
