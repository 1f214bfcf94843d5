"""What the rules that run a model ask a cluster for comes from the model's `resources` in the config."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = {
    "models": {"small": {"builtin": {"dataset": "facts", "layers": 2, "hidden": 32, "heads": 2, "mlp": 64}},
               "big": {"path": "some/7b-model", "resources": {"gpus": 2, "cpus": 8, "mem_mb": 64000,
                                                               "runtime": 240}}},
    "datasets": {"facts": {"synthetic": {"seed": 1, "name_pool": 8, "subject_sets": 10, "orders": 2}}},
    "sites": {"subj": {"component": "resid", "positions": "subject"}},
    "runs": {"a": {"model": "small", "dataset": "facts", "sites": ["subj"], "examples": 4},
             "b": {"model": "big", "dataset": "facts", "sites": ["subj"], "examples": 4, "device": "cuda"},
             "c": {"model": "big", "dataset": "facts", "sites": ["subj"], "examples": 4, "device": "cuda",
                   "intervention": "ablate"}},
    "traces": {"t": {"model": "small", "dataset": "facts", "facts": ["s000-city"]},
               "u": {"model": "big", "dataset": "facts", "facts": ["s000-city"], "device": "cuda"}},
}
MODEL_RULES = {"train_builtin_model", "predictions", "extract", "patch", "patch_without_extraction", "trace"}


# The pairs checkpoint plans a run's shards from the pairs it writes, so a dry run before them plans no
# extract or patch job on its own: the test asks for shard 0 of each run by name as well.
SHARD_TARGETS = ["all", "results/a/patch/0.nc", "results/b/patch/0.nc", "results/c/patch/0.nc",
                 "results/c/activations/0.nc"]


def dry_run_jobs(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                             "--directory", str(tmp_path), "--cores", "16", "--dry-run", *SHARD_TARGETS],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", result.stdout):
        rule = re.match(r"rule (\w+):", block)
        if rule and rule[1] != "all":
            wildcards = re.search(r"wildcards: (.*)", block)
            resources = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block)[1]))
            threads = re.search(r"threads: (\d+)", block)
            jobs.append((rule[1], wildcards[1] if wildcards else "", resources, int(threads[1]) if threads else 1))
    return jobs


def test_model_rules_ask_for_their_models_resources(tmp_path):
    jobs = dry_run_jobs(tmp_path)
    assert {rule for rule, *_ in jobs} >= MODEL_RULES | {"facts", "divergence", "heatmap", "trace_figure"}
    for rule, wildcards, resources, threads in jobs:
        if rule in MODEL_RULES:
            big = any(f"{key}={name}" in wildcards for key, name in (("run", "b"), ("run", "c"), ("model", "big"),
                                                                     ("trace", "u")))
            # a job asks for GPUs only where its run's device is not cpu (run a: cpu, the default), so the
            # local cap on GPU jobs leaves CPU runs alone; training always asks for the model's GPUs
            gpus = "2" if big else ("1" if rule == "train_builtin_model" else "0")
            assert resources["gpu"] == gpus, (rule, wildcards, resources)
            if rule != "train_builtin_model":  # the local cap (profiles/default) counts GPU jobs only
                assert resources["gpu_jobs"] == ("1" if big else "0"), (rule, wildcards, resources)
            assert resources["mem_mb"] == ("64000" if big else "4000"), (rule, wildcards, resources)
            assert resources["runtime"] == ("240" if big else "30"), (rule, wildcards, resources)
            assert threads == (8 if big else 2), (rule, wildcards, threads)
        else:
            assert "gpu" not in resources and "gpu_jobs" not in resources, (rule, resources)
