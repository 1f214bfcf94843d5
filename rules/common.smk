# Config validation (schema + cross-references) and the small functions the rules share. Every results path
# is written once, as its rule's output; the functions here fill those patterns in (filled).
import os
import re
import sys
from pathlib import Path

from patchmap import config as cfg
from patchmap import interventions, tracefacts
from patchmap.errors import UserError
from patchmap.schema import name_pattern
from patchmap.storage import check_writable_folders
from patchmap.shards import shards_of

try:
    for configfile_path in workflow.configfiles:
        cfg.load_yaml(configfile_path)  # Snakemake's own loader keeps the last of two equal keys: refuse them
    cfg.validate(config)
    cfg.check_dataset_files(config)  # before Snakemake reports a missing input in its own words
    check_writable_folders("results")  # before a job's log or Snakemake's own writes fail there
except UserError as error:
    sys.exit(f"patchmap: {error}")


# envs/patchmap.yaml installs patchmap from here (`-e ${PATCHMAP_ROOT}`) when --use-conda makes the env.
os.environ.update(PATCHMAP_ROOT=os.path.abspath(workflow.basedir))


# names become parts of paths: the schema's pattern for them is the one definition
wildcard_constraints:
    run="|".join(map(re.escape, config["runs"])),
    model=name_pattern(),
    dataset=name_pattern(),
    figure=name_pattern(),
    trace=name_pattern(),
    fact=name_pattern(),
    shard=r"\d+",


def filled(pattern, **wildcards):
    """One path: a rule's output pattern (rules.<rule>.output) with its wildcards filled in."""
    return expand(pattern, **wildcards)[0]


def run_of(wildcards):
    return config["runs"][wildcards.run]


def run_sites(wildcards):
    """The config entries of the run's sites, in the run's order."""
    return {s: config["sites"][s] for s in run_of(wildcards)["sites"]}


def without_resources(spec):
    """A model's config entry without its cluster resources: changing those must not redo its results."""
    return {k: v for k, v in spec.items() if k != "resources"}


def dataset_file(name):
    """The file a dataset's facts come from: the download's output for a url, its path, or nothing if
    synthetic."""
    dataset = config["datasets"][name]
    if "url" in dataset:
        ext = "jsonl" if dataset["url"].endswith(".jsonl") else "json"
        return [filled(rules.download_dataset.output[0], dataset=name, ext=ext)]
    return [os.path.expanduser(dataset["path"])] if "path" in dataset else []


def facts_file(wildcards):
    return filled(rules.facts.output[0], dataset=run_of(wildcards)["dataset"])


def trace_of(wildcards):
    return config["traces"][wildcards.trace]


def trace_facts_file(wildcards):
    """The facts of a trace's dataset (the facts rule's output), or nothing for a trace without one."""
    dataset = trace_of(wildcards).get("dataset")
    return [filled(rules.facts.output[0], dataset=dataset)] if dataset else []


def traced_facts():
    """(trace, fact name) of every traced fact, in config order."""
    return [(name, fact) for name, spec in config["traces"].items() for fact in tracefacts.names(spec)]


def model_name(wildcards):
    """The model a job runs: its {model} wildcard, or its run's or trace's model."""
    if "model" in wildcards.keys():
        return wildcards.model
    return trace_of(wildcards)["model"] if "trace" in wildcards.keys() else run_of(wildcards)["model"]


def model_source(name):
    """Where a model loads from: a built-in model's trained folder, else its path or hub id."""
    spec = config["models"][name]
    return filled(rules.train_builtin_model.output[0], model=name) if "builtin" in spec else spec["path"]


def model_identity(wildcards):
    """Every job that uses a model depends on its identity record (model_identity's output)."""
    return filled(rules.model_identity.output[0], model=model_name(wildcards))


def model_files(wildcards):
    """What a model's identity is made from: the trained directory of a built-in model, every file of a
    local checkpoint folder (so replacing them redoes the results), nothing for a hub id (pinned to the
    commit it resolves to when first used)."""
    source = model_source(wildcards.model)
    if "builtin" in config["models"][wildcards.model]:
        return source
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return []
    return sorted(str(f) for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def predicting_run(wildcards):
    """The run whose device and batch size make a model's predictions on a dataset in a dtype."""
    return config["runs"][cfg.predicting_run(config, wildcards.model, wildcards.dataset, wildcards.dtype)]


def predictions_input(wildcards):
    run = run_of(wildcards)
    return filled(rules.predictions.output[0], model=run["model"], dataset=run["dataset"], dtype=run["dtype"])


def runs_where(holds):
    """A wildcard pattern matching exactly the runs whose intervention (patchmap.interventions) `holds`."""
    names = [name for name, run in config["runs"].items() if holds(interventions.from_run(run))]
    return "|".join(map(re.escape, names)) or "(?!)"


def ablation_input(wildcards):
    """The values an intervention pools over the whole run (ablate), which its patch jobs write in."""
    pooled = interventions.from_run(run_of(wildcards)).pooled
    return filled(rules.ablation.output[0], run=wildcards.run) if pooled else []


def shards(run):
    """The run's shard numbers, from the pairs the pairs checkpoint wrote: until they exist, Snakemake
    plans nothing that needs them and re-evaluates the plan once they are written."""
    pairs_file = checkpoints.pairs.get(run=run).output[0]
    return shards_of(pairs_file, config["runs"][run]["shard_size"])


def patch_files(wildcards):
    return expand(rules.patch.output.patch, run=wildcards.run, shard=shards(wildcards.run))


# Cluster resources of the jobs that run a model (predictions, extract, patch, train_builtin_model), from the
# model's `resources` block in the config (schema defaults fit the built-in model). Local runs use
# `cpus` as the job's threads (capped by --cores) and `gpu_jobs` against the cap in profiles/default
# (one GPU job at a time), and ignore the rest; profiles/slurm turns them into
# sbatch options (--gpus, --cpus-per-task, --mem, -t). A retry (--retries) asks for more memory and time.
def job_device(wildcards):
    """The device a job's model runs on: its run's or trace's, or for predictions the predicting run's."""
    if "run" in wildcards.keys():
        return run_of(wildcards)["device"]
    if "trace" in wildcards.keys():
        return trace_of(wildcards)["device"]
    return predicting_run(wildcards)["device"]


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


def where_to_look(runs):
    """What the workflow prints when it finishes: each finished run's heatmap, explorer and table command."""
    lines = []
    for run in runs:
        divergence = filled(rules.divergence.output[0], run=run)
        if not os.path.exists(divergence):
            continue
        heatmap, explorer = filled(rules.heatmap.output.png, run=run), filled(rules.explorer.output[0], run=run)
        lines.append(f"patchmap run '{run}':")
        if os.path.exists(heatmap):
            lines.append(f"  heatmap   {heatmap}")
        if os.path.exists(explorer):
            lines.append(f"  explorer  {explorer}  (open it in a web browser; it needs no server)")
        lines.append(f"  table     python -m patchmap.summary {divergence}")
    return "\n".join(lines)
