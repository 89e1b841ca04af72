"""Small shared helpers: the data directory, atomic writes, user-facing errors, the CPU allocator."""
from __future__ import annotations

import contextlib
import ctypes
import difflib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the umask can only be read by setting it


class UserError(Exception):
    """An expected mistake by the user (bad config, missing file...). The CLI prints it as one line."""


def data_dir() -> Path:
    """Where corpora, tokenizers and token shards are cached (env HYPERLOOP_LM_DATA overrides)."""
    root = os.environ.get("HYPERLOOP_LM_DATA") or Path.home() / ".cache" / "hyperloop-lm"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; it replaces `path` only if the block finishes.

    A crash mid-write leaves the previous file untouched (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); give it the mode open() would
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; when the block finishes it is renamed to `path`, replacing
    what was there. A crash mid-write leaves the previous directory (or none), never a partial one.

    keep_existing: asked at the end; if true, the directory now at `path` wins and this build is dropped (a
    concurrent builder such as another DDP rank got there first; losing that race is then not an error).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private (0700); give it the mode mkdir() would
    try:
        yield tmp
        if keep_existing is None or not keep_existing():
            shutil.rmtree(path, ignore_errors=True)
            try:
                os.replace(tmp, path)
            except OSError:
                if keep_existing is None:
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if it was renamed in


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def closest(name: str, valid: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest valid name, or '' if nothing is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


_GLIBC_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory in the process instead of handing it back to the OS.

    A training step frees and re-allocates the same activation buffers every step. By default glibc
    serves the large ones (the logits, above all) with mmap and unmaps them when freed, so every step
    page-faults them in again and the kernel zeroes them; after this call a step takes no page faults
    once the heap has grown to its peak. `python -m benchmarks.run --default-allocator` measures the cost.
    Process-wide, like torch.set_num_threads; the resident memory then stays at the step's peak (a little
    above it, as freed blocks fragment), which training reaches every step anyway. Does nothing off glibc or when the user has set glibc's MALLOC_*_
    variables. Returns whether it applied."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in _GLIBC_MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    # mallopt returns 1 on success; -1 disables trimming, 0 disables mmap for large requests
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
