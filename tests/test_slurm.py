"""The tiny workflow through profiles/slurm on a real SLURM cluster (`bash .ci/start-slurm.sh` starts one).

One run is cancelled mid-way with `scancel` and run again, as a user would after a cancelled job; the
result must equal a local run's bit for bit. Skipped when no SLURM cluster answers `sinfo`, unless
PATCHMAP_REQUIRE_SLURM=1 (set by .ci/run), where that is a failure.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from workflow_utils import skip_unless_required

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 420  # seconds for one snakemake run; a run whose status checks fail can hang
# the tiny config of test_workflow.py, with two sites, and resources that fit the one-node test cluster
# (2 CPUs, 2 fake GPUs); device auto (not cpu) makes the model jobs ask for a GPU, and runs on the CPU
# where CUDA finds none. The run asks for 1,000 examples of a dataset of 24 facts (6 subjects x 4
# relations, no filler names: each has a partner) in shards of 12: it finds 24 pairs, so two shards, two
# GPU group jobs, and none for the shards that 1,000 examples would have made.
CONFIG = {
    "models": {"tiny": {"builtin": {"dataset": "tiny-facts", "layers": 2, "hidden": 32, "heads": 2, "mlp": 64,
                                    "train": {"max_steps": 20, "schedule_steps": 20, "batch_size": 16, "eval_every": 20,
                                              "target_accuracy": 0.0}},
                        "resources": {"gpus": 1, "cpus": 1, "mem_mb": 1000, "runtime": 10}}},
    "datasets": {"tiny-facts": {"synthetic": {"seed": 1, "name_pool": 8, "subject_sets": 10, "orders": 2}},
                 "few-facts": {"synthetic": {"seed": 1, "name_pool": 8, "subject_sets": 3, "orders": 2,
                                             "max_filler": 0}}},
    "sites": {"subj": {"label": "Subj.", "component": "resid", "positions": "subject"},
              "attn": {"label": "Attn.", "component": "attn", "positions": "last"}},
    "runs": {"tiny": {"model": "tiny", "dataset": "few-facts", "sites": ["subj", "attn"],
                      "examples": 1000, "shard_size": 12, "batch_size": 4, "known_only": False, "device": "auto"}},
}
SHARDS, SITES = 2, 2  # 24 pairs found, in shards of 12
GPU_LOGS = ["results/models/logs/tiny.log", "results/predictions/logs/tiny/few-facts/float32.log",
            "results/tiny/logs/patch/*.log"]
CPU_LOGS = ["results/datasets/logs/few-facts.facts.log", "results/models/logs/tiny.identity.log",
            "results/tiny/logs/pairs.log", "results/tiny/logs/divergence.log", "results/tiny/logs/heatmap.log",
            "results/tiny/logs/lines.log", "results/tiny/logs/explorer.log"]


def slurm_problem():
    """Why the cluster cannot be used, or None."""
    if shutil.which("sinfo") is None:
        return "no SLURM here: `sinfo` is not on PATH (start a test cluster: bash .ci/start-slurm.sh)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"no SLURM cluster reachable: `sinfo` failed: {probe.stderr.strip()[:200]}"
    if not re.search(r"^up (idle|mix|alloc)", probe.stdout, re.M):
        return f"no SLURM node is up: sinfo says {probe.stdout.strip()!r}"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')"
    return None


def write_config(workdir, config):
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def slurm_config():
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"^(\S+)\s+= (.*)$", out, re.M))


def slurm_args():
    """The profile, plus what this test cluster needs: squeue for status when there is no accounting
    database; quick first status checks; the plugin's per-job logs kept for the checks."""
    args = ["--profile", str(REPO / "profiles" / "slurm"), "--slurm-init-seconds-before-status-checks", "5",
            "--slurm-keep-successful-logs", "--retries", "0"]
    if slurm_config().get("AccountingStorageType", "").strip() == "accounting_storage/none":
        args += ["--slurm-status-command", "squeue", "--slurm-no-account"]
    return args


def snakemake_cmd(workdir, *args):
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
            str(workdir), *args]


def submitted(output):
    """{SLURM job id: plugin log path} for each job the run submitted with sbatch, and the run id."""
    jobs = {int(m[0]): m[1] for m in re.findall(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)", output)}
    run_id = re.search(r"SLURM run ID: (\S+)", output)
    return jobs, run_id[1] if run_id else None


def scontrol_jobs(ids):
    """{job id: `scontrol show job` fields} for the jobs slurmctld still knows (MinJobAge)."""
    found = {}
    for job in ids:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job)], capture_output=True, text=True).stdout
        if out.strip():
            found[job] = dict(re.findall(r"(\S+?)=(\S*)", out))
    return found


def cancel_leftovers(run_id):
    if run_id:
        subprocess.run(["scancel", "--name", run_id], capture_output=True)


def run_with_cancel(workdir, log_path):
    """Start the run, scancel its GPU group jobs once a patch job has started, wait for the end."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(snakemake_cmd(workdir, *slurm_args()), stdout=log, stderr=subprocess.STDOUT,
                                text=True)
    cancelled = []
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline and not cancelled:
            if list((workdir / "results" / "tiny" / "logs").glob("patch/*.log")):
                jobs, _ = submitted(Path(log_path).read_text())
                groups = [j for j, path in jobs.items() if "/group_" in path]
                running = scontrol_jobs(groups)
                cancelled = [j for j in groups if running.get(j, {}).get("JobState") in ("RUNNING", "PENDING")]
                for job in cancelled:
                    subprocess.run(["scancel", str(job)], check=True)
            time.sleep(0.5)
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = Path(log_path).read_text()
    cancel_leftovers(submitted(output)[1])
    return proc.returncode, output, cancelled


def run_to_end(workdir, log_path):
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(snakemake_cmd(workdir, *slurm_args()), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=RUN_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    output = Path(log_path).read_text()
    cancel_leftovers(submitted(output)[1])
    return code, output


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    skip_unless_required(slurm_problem(), "PATCHMAP_REQUIRE_SLURM")
    started = time.monotonic()
    # the local reference run goes on beside the cluster runs, which mostly wait for SLURM
    local = tmp_path_factory.mktemp("local")
    write_config(local, CONFIG)
    with open(local / "run.log", "w") as log:
        local_run = subprocess.Popen(snakemake_cmd(local, "--cores", "2"), stdout=log, stderr=subprocess.STDOUT)

    cluster = tmp_path_factory.mktemp("slurm")
    os.chmod(cluster, 0o755)  # jobs must be able to read and write here (they run as the submitting user)
    write_config(cluster, CONFIG)
    code1, out1, cancelled = run_with_cancel(cluster, cluster / "run1.log")
    jobs1, id1 = submitted(out1)
    seen1 = scontrol_jobs(jobs1)
    code2, out2 = run_to_end(cluster, cluster / "run2.log")
    jobs2, id2 = submitted(out2)
    seen2 = scontrol_jobs(jobs2)
    try:
        local_code = local_run.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        local_run.kill()
        local_code = "timeout"
    assert local_code == 0, (local / "run.log").read_text()[-4000:]
    print(f"SLURM test: {time.monotonic() - started:.0f} s in all; run 1 submitted {len(jobs1)} jobs, "
          f"cancelled {cancelled}; run 2 submitted {len(jobs2)} jobs")
    return {"local": local, "cluster": cluster, "cancelled": cancelled, "scontrol": {**seen1, **seen2},
            "runs": [(code1, out1, jobs1, id1), (code2, out2, jobs2, id2)]}


def test_cancelled_run_fails_and_the_rerun_completes(cluster_runs):
    (code1, out1, jobs1, _), (code2, out2, jobs2, _) = cluster_runs["runs"]
    assert cluster_runs["cancelled"], "no group job was running to cancel:\n" + out1[-3000:]
    assert code1 != 0, out1[-3000:]
    assert "Error in group shard" in out1, out1[-3000:]
    for job in cluster_runs["cancelled"]:
        slurm_log = re.search(rf"submitted with SLURM jobid {job} \(log: (\S+)\)", out1)[1]
        assert f"JOB {job} ON" in Path(slurm_log).read_text() and "CANCELLED AT" in Path(slurm_log).read_text()
    assert code2 == 0, out2[-4000:]
    # the rerun made only what the cancel left unfinished: the cancelled shards, then the summaries
    kinds = sorted(re.search(r"slurm_logs/(rule_\w+|group_\w+)/", path)[1] for path in jobs2.values())
    assert kinds == sorted(["group_shard_patch"] * len(cluster_runs["cancelled"])
                           + ["rule_divergence", "rule_heatmap", "rule_lines", "rule_explorer"]), jobs2


def test_every_job_went_through_sbatch(cluster_runs):
    """SLURM's own job completion log has each submitted job under the run's name; every rule's log
    was written inside one of them."""
    loc = slurm_config()["JobCompLoc"].strip()
    records = {}
    for line in Path(loc).read_text().splitlines():
        fields = dict(re.findall(r"(\S+?)=(\S*)", line))
        records[int(fields["JobId"])] = fields
    all_jobs = {}
    for code, out, jobs, run_id in cluster_runs["runs"]:
        assert jobs and run_id, out[-3000:]
        for job in jobs:
            assert job in records, f"SLURM job {job} has no record in {loc}"
            assert records[job]["Name"] == run_id
            assert records[job]["WorkDir"] == str(cluster_runs["cluster"])
            expected = "CANCELLED" if job in cluster_runs["cancelled"] else "COMPLETED"
            assert records[job]["JobState"] == expected, records[job]
        all_jobs.update(jobs)
    # facts, train, model identity, predictions, pairs and the two shard groups, then the rerun's groups,
    # divergence, heatmap, lines, explorer
    assert len(all_jobs) == 7 + len(cluster_runs["cancelled"]) + 4
    logs = [p for p in (cluster_runs["cluster"] / "results").rglob("logs/**/*.log")]
    # facts/divergence/heatmap/lines/explorer, train, identity, predictions, pairs, one patch job per shard
    assert len(logs) == 5 + 1 + 1 + 1 + 1 + SHARDS
    for log in logs:
        where = re.search(r"SLURM job (\d+)", log.read_text())
        assert where and int(where[1]) in all_jobs, f"{log} was not written in a SLURM job of this test"


def test_one_patch_job_per_shard_of_the_pairs_found(cluster_runs):
    """The run found 24 of the 1,000 examples it asked for: its first submission holds one GPU group job
    per shard of those 24, and none for an empty shard."""
    (_, out1, jobs1, _), _ = cluster_runs["runs"]
    kinds = [re.search(r"slurm_logs/(rule_\w+|group_\w+)/", path)[1] for path in jobs1.values()]
    assert kinds.count("group_shard_patch") == SHARDS, out1[-3000:]
    pairs_log = (cluster_runs["cluster"] / "results" / "tiny" / "logs" / "pairs.log").read_text()
    assert "asked for 1,000 examples, found 24 pairs" in pairs_log and "24 pairs: 2 shards of 12" in pairs_log


def test_gpu_rules_got_a_gpu(cluster_runs):
    cluster = cluster_runs["cluster"]
    gpu_jobs = set()
    for pattern in GPU_LOGS:
        paths = list(cluster.glob(pattern))
        assert paths, pattern
        for path in paths:
            text = path.read_text()
            assert re.search(r"CUDA_VISIBLE_DEVICES=\d", text), f"{path}: no GPU was allocated"
            gpu_jobs.add(int(re.search(r"SLURM job (\d+)", text)[1]))
    for pattern in CPU_LOGS:
        for path in cluster.glob(pattern):
            assert "CUDA_VISIBLE_DEVICES=(unset)" in path.read_text(), path
    seen = cluster_runs["scontrol"]
    for job in gpu_jobs & set(seen):
        assert "gpu:1" in seen[job].get("TresPerJob", ""), seen[job]
    assert gpu_jobs & set(seen), "slurmctld forgot every GPU job before the check"
    # one GPU job per shard, in which every site is patched after one model load
    ids = set()
    for shard in range(SHARDS):
        text = (cluster / f"results/tiny/logs/patch/{shard}.log").read_text()
        ids.add(re.search(r"SLURM job (\d+)", text)[1])
        assert text.count("loaded model") == 1 and re.search(r"patching sites Subj\. .*Attn\. ", text), text
    assert len(ids) == SHARDS, ids


def test_results_equal_a_local_run_bit_for_bit(cluster_runs):
    local = xr.load_dataset(cluster_runs["local"] / "results" / "tiny" / "divergence.nc")
    remote = xr.load_dataset(cluster_runs["cluster"] / "results" / "tiny" / "divergence.nc")
    assert set(local.data_vars) == set(remote.data_vars) and len(local.data_vars) >= 10
    for name in local.data_vars:
        assert np.array_equal(local[name].values, remote[name].values), name
    for name in local.coords:
        assert np.array_equal(local[name].values, remote[name].values), name
    assert local.attrs["model_weights_sha256"] == remote.attrs["model_weights_sha256"]
    assert local.attrs["dataset_sha256"] == remote.attrs["dataset_sha256"]
    assert yaml.safe_load(remote.attrs["config_yaml"]) == yaml.safe_load(local.attrs["config_yaml"])
