"""Running the workflow through the `snakemake` command in a temporary directory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "models": {"tiny": {"builtin": {"dataset": "tiny-facts", "layers": 2, "hidden": 32, "heads": 2, "mlp": 64,
                                    "train": {"max_steps": 20, "schedule_steps": 20, "batch_size": 16, "eval_every": 20,
                                              "target_accuracy": 0.0}}}},
    "datasets": {"tiny-facts": {"synthetic": {"seed": 1, "name_pool": 8, "subject_sets": 10, "orders": 2}}},
    "sites": {"subj": {"label": "Subj.", "component": "resid", "positions": "subject"},
              "attn": {"label": "Attn.", "component": "attn", "positions": "last"},
              "mlp": {"label": "MLP rel.", "component": "mlp", "positions": "relation"}},
    "runs": {"tiny": {"model": "tiny", "dataset": "tiny-facts", "sites": ["subj", "attn", "mlp"],
                      "examples": 12, "shard_size": 5, "batch_size": 4, "known_only": False}},
}


def skip_unless_required(problem, variable: str) -> None:
    """Skip the test for `problem` (what the machine lacks, e.g. a browser or a cluster; None: nothing), or
    fail it where the environment variable `variable` is 1 (.ci/run sets it: there the test must run)."""
    if problem:
        if os.environ.get(variable) == "1":
            pytest.fail(f"{variable}=1 but {problem}")
        pytest.skip(problem)


def snakemake_command(workdir, *args):
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--cores", "2", *args]


def snakemake(workdir, *args, timeout=600):
    return subprocess.run(snakemake_command(workdir, *args), capture_output=True, text=True, timeout=timeout)


def write_config(workdir, config):
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def finished_workflow(tmp_path_factory, name, config):
    """A workdir in which the workflow ran to completion on `config`."""
    workdir = tmp_path_factory.mktemp(name)
    write_config(workdir, config)
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


LOADED = re.compile(r"loaded model (.+) in ([0-9.]+) s")


def count_model_loads_in(log):
    """The `loaded model <source> in <seconds> s` lines in one job log."""
    return len(LOADED.findall(log.read_text()))


def count_model_loads(workdir):
    """The model loads logged by every job of a finished workflow."""
    return sum(count_model_loads_in(log) for log in (workdir / "results").rglob("logs/**/*.log"))
