"""The runtime of one workflow job: its log (the rule's log file and the terminal), the line that says
where it runs, and how its errors end it (a user's mistake as one `patchmap:` line, a bug with its
traceback in the log)."""

import logging
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

log = logging.getLogger("patchmap")


@contextmanager
def reported_errors(log_path=None):
    """Set up logging to the rule's log file; turn a UserError into one line (in the log file if there is
    one, else on the terminal) and exit status 1. Any other exception is a bug: its traceback goes into
    the log file (where cluster users look, and which Snakemake shows after a failed job), and the
    terminal gets one line pointing there; without a log file the exception propagates as usual."""
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
        # with a log file the line goes there only: Snakemake shows a failed job's log on the terminal
        # (show-failed-logs, profiles/default), so the terminal gets it once
        log.error("patchmap: %s", e, extra={"log_file_only": bool(log_path)})
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


def log_where():
    """One line naming the host, the SLURM job and the GPUs the job was given (CUDA_VISIBLE_DEVICES)."""
    env = os.environ
    slurm = f"SLURM job {env['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in env else "no SLURM job"
    log.info("host %s, %s, CUDA_VISIBLE_DEVICES=%s", platform.node(), slurm,
             env.get("CUDA_VISIBLE_DEVICES", "(unset)"))


def use_threads(threads):
    """The job's torch threads (its rule's `threads`), set after the log says where the job runs: importing
    torch takes seconds."""
    import torch
    torch.set_num_threads(threads)
