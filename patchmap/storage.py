"""Atomic writes: a result appears whole under its final name, or not at all."""

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 1 << 20  # bytes free under which a failed write is taken for a full disk


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_leftovers(path):
    """Temporary files of an earlier writer of `path` that was killed before it could clean up."""
    for old in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def disk_is_full(error, folder):
    """Whether a failed write failed for want of space. netCDF and HDF5 hide the cause (they report
    "HDF error" or "Permission denied"), so an error from a folder with almost no space left counts too."""
    if getattr(error, "errno", None) in DISK_FULL or any(
            text in str(error) for text in ("No space left on device", "Disk quota exceeded")):
        return True
    try:
        return isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


@contextmanager
def full_disk_reported(path):
    """Turn a write that failed on a full disk into one line naming the file and the folder."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        folder = Path(path).parent
        if not disk_is_full(e, folder):
            raise
        raise UserError(f"the disk is full: no space left to write {path} ({_free(folder)} free in "
                        f"{folder.resolve()}); free some space there and run again") from None


def _free(folder):
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB"
    except OSError:
        return "no space"


def atomic_path(path):
    """Yield a temporary file name beside `path`; move it into place only if the block succeeds."""
    return _replaced_atomically(path, directory=False)


def atomic_directory(path):
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    return _replaced_atomically(path, directory=True)


@contextmanager
def _replaced_atomically(path, directory):
    path = Path(path)
    tmp = None
    try:
        with full_disk_reported(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(path)
            if directory:
                tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            else:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
            yield tmp
            os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())  # mkstemp/mkdtemp make them private
            if directory and path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp and os.path.exists(tmp):
            shutil.rmtree(tmp) if directory else os.remove(tmp)


def write_netcdf(dataset, path):
    with atomic_path(path) as tmp:
        dataset.to_netcdf(tmp, engine="netcdf4")


def check_writable_folders(root):
    """Every folder under `root` (results/) that exists is writable: a read-only one (its permissions, an
    immutable flag, a read-only mount) would fail the jobs that write their outputs, logs and benchmarks
    there, some of them in Snakemake's own code. Nothing is written to find out."""
    for folder, _, _ in os.walk(root):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"cannot write in {folder}: the folder is read-only (its permissions, an immutable "
                            "flag or a read-only mount); make it writable and run again")
