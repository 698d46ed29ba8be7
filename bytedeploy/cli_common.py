"""Helpers shared by the command modules (cli.py and deploy_cli.py); imports neither of them, nor torch."""

from __future__ import annotations

from pathlib import Path

from bytedeploy.errors import UserError


def check_writable_parent(path: Path) -> None:
    """Refuse, before any work, an output whose folder cannot be made because a file stands in its way."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
            return


def argument_bytes(text: str, option: str) -> bytes:
    """A text argument as the bytes typed on the command line: Python hands argv bytes that are not UTF-8 over as
    surrogate escapes (PEP 383), which turn back into the same bytes here."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise UserError(f"{option} holds U+{ord(text[e.start]):04X} at offset {e.start}, which is not text") from None
