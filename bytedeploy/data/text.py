"""Text corpora for the token-level families (char GPT-2, sigma-GPT, the Bayesian-flow LM).

  builtin:stdlib   the standard library's .py files decoded as UTF-8, joined in path order (offline, ~30 MB)
  a file           its UTF-8 text
  a folder         its files' UTF-8 text, joined in path order

Eval text: for builtin:stdlib and folders, the files whose path hash falls under the eval fraction (the same split
as the byte families); for a single file, its last eval fraction of characters.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from bytedeploy.data.files import read_folder, split_records, stdlib_records
from bytedeploy.errors import UserError


def decode_utf8(data: bytes, source: str, cut: bool = False) -> str:
    """Strict UTF-8; cut=True when data was cut at a byte count (--first-mb): a character split by the cut is
    dropped instead of being reported as invalid."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if cut and e.reason == "unexpected end of data" and e.end == len(data):
            return data[:e.start].decode("utf-8")
        raise UserError(f"{source} is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}") from None


def load_corpus(spec: str, options: dict, stdlib_mb: float) -> tuple[str, str]:
    """(train text, eval text) as a text family's data options ask: eval_data, when given, is the eval text and
    nothing of spec is held out; else an eval_split fraction of spec is. first_mb keeps the first N megabytes of
    spec (builtin:stdlib: stdlib_mb unless first_mb says)."""
    first_mb = options.get("first_mb")
    if first_mb is None and spec == "builtin:stdlib":
        first_mb = stdlib_mb
    if first_mb is not None and first_mb <= 0:
        raise UserError(f"--first-mb must be > 0, got {first_mb}")
    if options.get("eval_data"):
        train, evals = cached_split(spec, 0.0, first_mb)[0], cached_split(options["eval_data"], 0.0, None)[0]
    else:
        train, evals = cached_split(spec, options.get("eval_split", 0.05), first_mb)
    if not train:
        raise UserError(f"no training text in {spec}")
    return train, evals


@functools.lru_cache(maxsize=4)
def cached_split(spec: str, eval_fraction: float, first_mb: float | None) -> tuple[str, str]:
    """load_text_split, read once: a family's prepare_config and make_data both need the corpus."""
    return load_text_split(spec, eval_fraction, first_mb)


def load_text_split(spec: str, eval_fraction: float = 0.05, first_mb: float | None = None) -> tuple[str, str]:
    """-> (train text, eval text). first_mb keeps only the first N megabytes of the corpus (GPT-burn's option)."""
    path = Path(spec)
    if spec == "builtin:stdlib" or (not spec.startswith("builtin:") and path.is_dir()):
        records = stdlib_records() if spec == "builtin:stdlib" else read_folder(path)
        if first_mb is not None:
            records = _first_bytes(records, int(first_mb * 1e6))
        train, evals = split_records(records, eval_fraction)
        # stdlib holds a few files that are not UTF-8 (test data); a user's folder must be clean
        lenient = spec == "builtin:stdlib"
        return _join(train, lenient), _join(evals, lenient)
    if spec.startswith("builtin:"):
        raise UserError(f"no built-in text {spec!r}; use builtin:stdlib, a text file or a folder")
    if not path.exists():
        raise UserError(f"data path not found: {spec}")
    if not path.is_file():
        raise UserError(f"data path is neither a file nor a folder: {spec}")
    data = path.read_bytes()
    truncated = first_mb is not None and int(first_mb * 1e6) < len(data)
    if truncated:
        data = data[:int(first_mb * 1e6)]
    text = decode_utf8(data, spec, cut=truncated)
    if not text:
        raise UserError(f"{spec} is empty")
    cut = int(len(text) * (1 - eval_fraction))
    return text[:cut], text[cut:]


def _first_bytes(records, limit: int):
    out, total = [], 0
    for r in records:
        if total >= limit:
            break
        out.append(r)
        total += len(r.data)
    return out


def _join(records, lenient: bool) -> str:
    parts = []
    for r in records:
        if lenient:
            try:
                parts.append(r.data.decode("utf-8"))
            except UnicodeDecodeError:
                continue
        else:
            parts.append(decode_utf8(r.data, r.name))
    return "\n".join(parts)


class TokenWindows:
    """Token-id streams cut into windows of block_size + 1 (inputs and shifted targets) for next-token training."""

    def __init__(self, train_ids, eval_ids, block_size: int, unit: str = "token"):
        self.train = np.asarray(train_ids, dtype=np.int64)
        self.evals = np.asarray(eval_ids, dtype=np.int64)
        self.block_size, self.unit = block_size, unit
        for name, ids in (("train", self.train), ("eval", self.evals)):
            if len(ids) < block_size + 1:
                raise UserError(f"the {name} text has {len(ids)} tokens; the context needs {block_size + 1}")

    def describe(self) -> str:
        return f"{len(self.train):,} train / {len(self.evals):,} eval {self.unit}s"

    def train_batch(self, rng, batch_size: int):
        starts = rng.integers(0, len(self.train) - self.block_size, size=batch_size)
        return self._windows(self.train, starts)

    def eval_batches(self, batch_size: int, max_batches: int):
        n = batch_size * max_batches
        starts = np.linspace(0, len(self.evals) - self.block_size - 1, num=n).astype(np.int64)
        for i in range(0, n, batch_size):
            yield self._windows(self.evals, starts[i:i + batch_size])

    def _windows(self, ids, starts):
        import torch

        rows = torch.from_numpy(ids[starts[:, None] + np.arange(self.block_size + 1)[None]])
        return {"idx": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous()}
