"""The runtime of one workflow job: its log (the rule's log file and the terminal), the line that says
where it runs, and how its errors end it (a user's mistake as one `patchmap:` line, a bug with its
traceback in the log).

Reporting never replaces what it reports: a log file that cannot be written (a full disk, a quota, a
read-only folder, a vanished mount) is said once, on one `patchmap:` line, and the job goes on logging to
the terminal alone; a terminal that went away (a broken pipe, a full disk under a SLURM output file) is
dropped quietly; a character the terminal cannot encode is escaped."""

import logging
import os
import platform
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .storage import LOW_SPACE

log = logging.getLogger("patchmap")
FORMAT = "%(asctime)s %(levelname)s %(message)s"


class TerminalStream:
    """sys.stderr for a job: a write that fails because the terminal went away is dropped (and so is every
    later one), and characters its encoding lacks are escaped, so that printing can never raise."""

    def __init__(self, stream):
        self.stream, self.gone = stream, False

    def write(self, text):
        if self.gone:
            return len(text)
        try:
            return self.stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(self.stream, "encoding", None) or "ascii"
            return self.write(text.encode(encoding, "backslashreplace").decode(encoding))
        except (OSError, ValueError):  # a broken pipe, a full disk, a closed file
            self.gone = True
            return len(text)

    def flush(self):
        if not self.gone:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.gone = True

    def __getattr__(self, name):
        return getattr(self.stream, name)


class JobLogFile(logging.FileHandler):
    """The rule's log file, opened at the first record. If writing it fails, `on_failure(reason, record)` is
    called once and the handler writes nothing more."""

    def __init__(self, path, on_failure):
        super().__init__(path, mode="w", encoding="utf-8", errors="backslashreplace", delay=True)
        self.on_failure, self.failed = on_failure, None

    def emit(self, record):
        if self.failed is not None:
            return
        try:
            super().emit(record)  # opens the file first: an error there is not routed to handleError
        except Exception:
            self.handleError(record)

    def handleError(self, record):
        reason = sys.exc_info()[1]
        if self.failed is not None:
            return
        self.failed = reason
        try:
            self.close()
        except (OSError, ValueError):  # closing flushes what did not fit
            self.stream = None
        self.on_failure(reason, record)


class TerminalHandler(logging.StreamHandler):
    """The terminal's share of the log: every record but those meant for the log file only, while the log
    file works."""

    def __init__(self, stream, job_log):
        super().__init__(stream)
        self.job_log = job_log

    def filter(self, record):
        return not (getattr(record, "log_file_only", False) and self.job_log.file_works) and super().filter(record)

    def handleError(self, record):
        pass  # the stream (a TerminalStream) drops what it cannot write; nothing else can fail here


class JobLog:
    """Where one job's log goes: the rule's log file (if it can be written) and the terminal."""

    def __init__(self, log_path):
        self.path = Path(log_path) if log_path else None
        self.terminal = TerminalHandler(sys.stderr, self)
        self.file = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self.announce(e)
            else:
                self.file = JobLogFile(self.path, self.file_failed)

    @property
    def file_works(self):
        return self.file is not None and self.file.failed is None

    def handlers(self):
        return [self.terminal] + ([self.file] if self.file is not None else [])

    def announce(self, reason):
        """The one line that says the log file cannot be written, and why."""
        self.terminal.stream.write(f"patchmap: cannot write the log file {self.path} ({describe(reason)}); "
                                   "logging to the terminal only\n")
        self.terminal.stream.flush()

    def file_failed(self, reason, record):
        self.announce(reason)
        if getattr(record, "log_file_only", False):  # the terminal, first among the handlers, skipped it
            self.terminal.handle(record)


def describe(error):
    """An OSError's reason in words ("No space left on device"), else the error's own text."""
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


@contextmanager
def reported_errors(log_path=None):
    """Set up logging to the rule's log file and the terminal; turn a UserError into one `patchmap:` line
    (in the log file, which Snakemake shows after a failed job, or on the terminal where there is no log
    file or it cannot be written) and exit status 1. Any other exception is a bug: its traceback goes into
    the log file (where cluster users look), and the terminal gets one line pointing there; where the log
    cannot be written the traceback goes to the terminal; without a log file it propagates as usual."""
    terminal, sys.stderr = sys.stderr, TerminalStream(sys.stderr)
    job_log = JobLog(log_path)
    logging.basicConfig(level=logging.INFO, format=FORMAT, handlers=job_log.handlers(), force=True)
    log_where()
    try:
        yield
        check_room_to_finish(log_path)
    except UserError as e:
        log.error("patchmap: %s", e, extra={"log_file_only": True})
        sys.exit(1)
    except Exception as e:
        if not log_path:
            raise
        log.exception("the job failed with an unexpected error (a bug: please report it with this log)",
                      extra={"log_file_only": True})
        if job_log.file_works:
            first_line = (str(e).strip().splitlines() or [""])[0]
            print(f"the job failed with an unexpected error, {type(e).__name__}: {first_line}; the traceback is "
                  f"in {log_path}", file=sys.stderr)
        sys.exit(1)
    finally:
        sys.stderr = terminal


def check_room_to_finish(log_path):
    """After the job's work: Snakemake then writes the job's benchmark file beside its log, and a write that
    fails there removes the job's outputs with an OSError that names no file. A disk that is full already
    is said here instead, in the job's own words."""
    if not log_path:
        return
    folder = Path(log_path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < LOW_SPACE:
        raise UserError(f"the disk is full: {free / 1e6:.1f} MB free in {folder.resolve()}, where this job's log "
                        "and benchmark go; free some space there and run again")


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
