"""Faults: a patch job killed with SIGKILL mid-run resumes to the same numbers; fresh runs are
bit-identical; two runs in one results tree keep to their own files."""

import copy
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import xarray as xr
from workflow_utils import TINY, finished_workflow, snakemake, snakemake_command, write_config

TWO_RUNS = copy.deepcopy(TINY)
TWO_RUNS["runs"]["tiny"].update(examples=24, shard_size=24, batch_size=1, engine="reference")  # slow enough to catch
TWO_RUNS["runs"]["other"] = {"model": "tiny", "dataset": "tiny-facts", "sites": ["attn"], "examples": 6,
                             "intervention": "ablate", "value": "mean",
                             "shard_size": 6, "known_only": False, "seed": 3}


def pids_running(fragment):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stop_patch_job_mid_run(workdir, log, timeout=300):
    """Wait until the patch job of shard 0 logs that it started patching, freeze it, return its pids."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and "patching site" in log.read_text():
            # this workdir's job scripts only: other tests (and other pytest-xdist workers) run patch jobs too
            pids = pids_running(str(workdir / ".snakemake" / "scripts"))
            pids = [p for p in pids if "patch" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            return pids
        time.sleep(0.01)
    raise AssertionError("the patch job never started")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return finished_workflow(tmp_path_factory, "uninterrupted", TWO_RUNS)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("killed")
    write_config(workdir, TWO_RUNS)
    output = workdir / "results" / "tiny" / "patch" / "0.nc"
    log = workdir / "results" / "tiny" / "logs" / "patch" / "0.log"
    run = subprocess.Popen(snakemake_command(workdir), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        pids = stop_patch_job_mid_run(workdir, log)
        assert pids, "no patch job process found"
        assert not output.exists(), "the job was stopped after it wrote its output"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        first, _ = run.communicate(timeout=300)
    finally:
        run.kill()
    assert run.returncode != 0
    assert not output.exists()
    second = snakemake(workdir)  # the same command again
    assert second.returncode == 0, second.stderr[-4000:]
    return workdir, first


def data_of(path):
    return xr.load_dataset(path).drop_attrs()


def test_killed_patch_job_resumes_to_identical_numbers(uninterrupted, killed_and_resumed):
    workdir, first_log = killed_and_resumed
    assert "Error in rule patch" in first_log
    for run in ("tiny", "other"):
        a = data_of(uninterrupted / "results" / run / "divergence.nc")
        b = data_of(workdir / "results" / run / "divergence.nc")
        xr.testing.assert_identical(a, b)  # bit for bit: two fresh runs, one of them killed and resumed
    assert not list((workdir / "results").rglob("*.tmp")), "a killed writer's temporary file was left behind"


def test_fresh_runs_train_identical_models(uninterrupted, killed_and_resumed):
    workdir, _ = killed_and_resumed
    a = (uninterrupted / "results" / "models" / "tiny" / "model.safetensors").read_bytes()
    b = (workdir / "results" / "models" / "tiny" / "model.safetensors").read_bytes()
    assert a == b


def test_two_runs_keep_to_their_own_files(uninterrupted):
    results = uninterrupted / "results"
    assert sorted(p.name for p in results.iterdir()) == ["datasets", "models", "other", "predictions", "tiny"]
    assert sorted(p.name for p in (results / "other" / "patch").iterdir()) == ["0.nc"]
    assert (results / "other" / "ablation.nc").exists() and not (results / "tiny" / "ablation.nc").exists()
    assert sorted(p.name for p in (results / "tiny" / "patch").iterdir()) == ["0.nc"]
    assert list(xr.load_dataset(results / "tiny" / "patch" / "0.nc")["site"].values) == ["subj", "attn", "mlp"]
    # the two runs share the model's predictions on the dataset (same dtype): one file, one job
    assert [p.name for p in (results / "predictions" / "tiny" / "tiny-facts").iterdir()] == ["float32.nc"]
    other = xr.load_dataset(results / "other" / "divergence.nc")
    tiny = xr.load_dataset(results / "tiny" / "divergence.nc")
    assert other.attrs["intervention"] == "ablate"
    assert other.attrs["run"] == "other" and other.sizes["example"] == 6 and list(other["site"].values) == ["Attn."]
    assert tiny.attrs["run"] == "tiny" and tiny.sizes["example"] == 24
