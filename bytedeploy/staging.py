"""Folders written whole (checkpoints, bundles): build the new folder beside the old one, then swap it in, so that a
failure at any point leaves the old folder as it was. Imports no torch (the deploy side writes bundles too)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path


def staging_dir(dst: Path) -> Path:
    """A new empty folder beside dst: the same filesystem, so the swap is a rename."""
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def set_default_modes(folder: Path) -> None:
    """Give folder and everything in it the modes an ordinary mkdir and open give (0777 / 0666 less the umask):
    mkdtemp makes 0700 folders and safetensors 0600 files, which would keep the result from every other user."""
    mask = current_umask()
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def replace_dir(new: Path, dst: Path) -> None:
    """Swap the finished folder in; if that fails, the old one goes back where it was."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_error(e: BaseException) -> str:
    """Why a write failed, in one line: "No space left on device", also from safetensors' and torch's wrappers."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    inner = re.search(r'message: "([^"]+)"', str(e))  # safetensors: IoError(Os { code: 28, ..., message: "..." })
    if inner:
        return inner.group(1)
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
