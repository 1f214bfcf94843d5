"""Faults in the reporting itself never hide what a job reports: a log file that cannot be written (a full
disk, a read-only folder), a terminal that went away (a broken pipe), a character the terminal cannot
encode. The job says so once, on one `patchmap:` line, and its own outcome is unchanged."""

import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
import xarray as xr
import yaml
from workflow_utils import REPO, snakemake, write_config

from patchmap import runtime
from patchmap.errors import UserError


def is_root():
    return os.geteuid() == 0


@contextmanager
def read_only(folder):
    """`folder` made read-only for this process: an immutable flag for root (whom permissions do not stop),
    else its permissions."""
    folder.mkdir(parents=True, exist_ok=True)
    if is_root():
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("root needs chattr +i (an ext2/3/4-like file system) to make a folder read-only")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        yield folder
    finally:
        subprocess.run(undo, check=True)


@contextmanager
def full_disk(folder):
    """A tiny tmpfs at `folder`, filled to the last byte (needs root)."""
    if not is_root() or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(folder / ".filler", "wb") as filler:
            try:
                filler.write(b"\0" * 100_000)
                filler.flush()
            except OSError:
                pass
        assert shutil.disk_usage(folder).free == 0
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def terminal_problems(text):
    """What must never reach the terminal: logging's own error reports and Python tracebacks."""
    return [line for line in text.splitlines() if "Logging error" in line or "Traceback" in line]


def run_job(tmp_path, body, log_path, **env):
    """A job's script: `body` inside runtime.reported_errors(log_path), in a fresh Python; returns the
    completed process (stderr as text)."""
    script = tmp_path / "job.py"
    script.write_text("import logging, sys\nfrom patchmap import runtime\nfrom patchmap.errors import UserError\n"
                      "log = logging.getLogger('patchmap')\n"
                      f"with runtime.reported_errors({None if log_path is None else str(log_path)!r}):\n"
                      + textwrap.indent(textwrap.dedent(body), "    "))
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment, timeout=120)


# ---------------------------------------------------------------------------------------------------
# The workflow on a real full disk, and with a read-only log folder

@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny_model_dir):
    """A workdir whose run `tiny` (a local checkpoint) has its predictions made: what is left to write
    is the run's own folder, results/tiny/."""
    workdir = tmp_path_factory.mktemp("reporting")
    config = {"models": {"tiny": {"path": str(tiny_model_dir), "resources": {"cpus": 1}}},
              "datasets": {"facts": {"synthetic": {"seed": 0, "name_pool": 8, "subject_sets": 6, "orders": 2}}},
              "sites": {"subj": {"label": "Subj.", "component": "resid", "positions": "subject"}},
              "runs": {"tiny": {"model": "tiny", "dataset": "facts", "sites": ["subj"], "examples": 6,
                                "shard_size": 6, "batch_size": 3, "known_only": False}}}
    write_config(workdir, config)
    result = snakemake(workdir, "results/predictions/tiny/facts/float32.nc")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_a_full_disk_says_so_once_without_logging_errors_or_tracebacks(predicted):
    with full_disk(predicted / "results" / "tiny") as disk:
        result = snakemake(predicted)
        terminal = result.stdout + result.stderr
        assert result.returncode != 0
        assert terminal_problems(terminal) == []
        assert terminal.count("patchmap: the disk is full") == 1, terminal[-3000:]
        assert terminal.count("patchmap: cannot write the log file results/tiny/logs/pairs.log (No space left on "
                              "device); logging to the terminal only") == 1
        written = [p for p in disk.rglob("*") if p.is_file() and p.name != ".filler" and p.stat().st_size > 0]
        assert written == []  # nothing half-written (the empty log file is all)


def test_a_read_only_log_folder_stops_the_workflow_with_one_line(predicted):
    with read_only(predicted / "results" / "tiny" / "logs"):
        result = snakemake(predicted)
    terminal = result.stdout + result.stderr
    assert result.returncode != 0
    assert terminal_problems(terminal) == []
    lines = [line for line in terminal.splitlines() if "patchmap:" in line]
    assert lines == ["patchmap: cannot write in results/tiny/logs: the folder is read-only (its permissions, an "
                     "immutable flag or a read-only mount); make it writable and run again"]
    assert not (predicted / "results" / "tiny" / "pairs.nc").exists()


# ---------------------------------------------------------------------------------------------------
# One job: its log file cannot be written, its terminal went away, its message has unprintable characters

@pytest.mark.parametrize("outcome", ["success", "user error", "bug"])
def test_a_job_whose_log_cannot_be_written_logs_to_the_terminal(tmp_path, outcome):
    logs = tmp_path / "logs"
    body = {"success": "log.info('step one')\nlog.info('step two')\n",
            "user error": "log.info('step one')\nraise UserError('the one clear line')\n",
            "bug": "log.info('step one')\n{}['missing']\n"}[outcome]
    with read_only(logs):
        result = run_job(tmp_path, body, logs / "job.log")
    lines = [line[line.index("patchmap:"):] for line in result.stderr.splitlines() if "patchmap:" in line]
    assert lines[0].startswith(f"patchmap: cannot write the log file {logs / 'job.log'} (")
    assert lines[0].endswith("); logging to the terminal only")
    assert "Logging error" not in result.stderr and "step one" in result.stderr
    assert not (logs / "job.log").exists()
    if outcome == "success":
        assert result.returncode == 0 and len(lines) == 1 and "step two" in result.stderr
    elif outcome == "user error":
        assert result.returncode == 1 and lines[1:] == ["patchmap: the one clear line"]
        assert "Traceback" not in result.stderr
    else:  # a bug keeps its traceback: on the terminal, since the log cannot hold it
        assert result.returncode == 1 and len(lines) == 1
        assert "Traceback (most recent call last)" in result.stderr and "KeyError: 'missing'" in result.stderr
        assert "the traceback is in" not in result.stderr


def test_a_job_whose_terminal_went_away_still_finishes_and_logs(tmp_path):
    """stderr is a pipe whose reader is gone (a closed terminal): the job's progress bar and log lines
    cannot be written there, and the job still ends as its work does, with its log file whole."""
    body = ("from tqdm.auto import tqdm\n"
            "for _ in tqdm(range(3), desc='work', mininterval=0):\n"
            "    log.info('a step')\n"
            "log.info('done')\n")
    script = tmp_path / "job.py"
    script.write_text("import logging\nfrom patchmap import runtime\nlog = logging.getLogger('patchmap')\n"
                      f"with runtime.reported_errors({str(tmp_path / 'job.log')!r}):\n"
                      + textwrap.indent(body, "    "))
    read, write = os.pipe()
    os.close(read)  # nobody reads the job's terminal
    try:
        job = subprocess.run([sys.executable, str(script)], stderr=write, stdout=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    finally:
        os.close(write)
    assert job.returncode == 0
    text = (tmp_path / "job.log").read_text()
    assert text.count("a step") == 3 and "done" in text


def test_unprintable_characters_are_escaped_on_the_terminal_and_kept_in_the_log(tmp_path):
    body = "raise UserError('subject \u00c5ngstr\u00f6m \u2192 \u6771\u4eac')\n"
    result = run_job(tmp_path, body, tmp_path / "job.log", PYTHONIOENCODING="ascii:strict")
    assert result.returncode == 1 and terminal_problems(result.stderr) == []
    assert (tmp_path / "job.log").read_text(encoding="utf-8").count("subject \u00c5ngstr\u00f6m \u2192 \u6771\u4eac") == 1
    no_log = run_job(tmp_path, body, None, PYTHONIOENCODING="ascii:strict")  # the terminal alone: escaped
    assert no_log.returncode == 1 and terminal_problems(no_log.stderr) == []
    assert "patchmap: subject \\xc5ngstr\\xf6m \\u2192 \\u6771\\u4eac" in no_log.stderr


def test_the_summary_printed_into_a_closed_pipe_ends_quietly(tmp_path):
    """`python -m patchmap.summary divergence.nc | head -1`: the pipe closes before the table is written."""
    import numpy as np
    ds = xr.Dataset({"js_mean": (("site", "layer"), np.random.default_rng(0).random((40, 30)))},
                    coords={"site": [f"site {i}" for i in range(40)], "layer": np.arange(30)})
    ds.to_netcdf(tmp_path / "divergence.nc")
    command = f"{sys.executable} -m patchmap.summary {tmp_path / 'divergence.nc'} | head -1"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.stdout.strip().startswith("layer") and result.stderr == ""


def test_a_disk_too_full_for_the_benchmark_is_said_by_the_job(tmp_path, monkeypatch):
    """Snakemake writes a job's benchmark file after the job, beside its log; a write that fails there
    removes the job's outputs with an OSError that names no file. The job says it first."""
    (tmp_path / "logs").mkdir()
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=10_000))
    with pytest.raises(UserError, match=r"the disk is full: 0\.0 MB free in .*logs, where this job's log and "
                                        "benchmark go"):
        runtime.check_room_to_finish(tmp_path / "logs" / "job.log")
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    runtime.check_room_to_finish(tmp_path / "logs" / "job.log")  # room enough: nothing to say
