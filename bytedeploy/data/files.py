"""Where training bytes come from: built-in sources (no downloads) or any folder of files.

  builtin:stdlib       the running Python's standard-library .py files
  builtin:cpu-states   traces of bGPT's toy CPU (bytedeploy.data.cpu_states), generated in memory
  PATH                 every file under a folder, recursively

The train/eval split is deterministic: a file goes to eval when the hash of its relative path falls under the
eval fraction, so the split never changes between runs or machines.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bytedeploy.errors import UserError

BUILTIN_SOURCES = ("builtin:stdlib", "builtin:cpu-states")


@dataclass
class FileRecord:
    name: str  # path relative to the source root, '/'-separated
    data: bytes

    @property
    def ext(self) -> str:
        base = self.name.rsplit("/", 1)[-1]
        return base.rsplit(".", 1)[-1] if "." in base else ""

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name.rsplit("/", 1)[-1] else self.name


def in_eval_split(name: str, eval_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "little")
    return h / 2**64 < eval_fraction


def split_records(records: list[FileRecord], eval_fraction: float) -> tuple[list[FileRecord], list[FileRecord]]:
    train = [r for r in records if not in_eval_split(r.name, eval_fraction)]
    evals = [r for r in records if in_eval_split(r.name, eval_fraction)]
    if not evals and records and eval_fraction > 0:  # tiny folders: keep at least one eval file
        evals, train = train[-1:], train[:-1]
    if not train:
        raise UserError("every file fell into the eval split; lower --eval-split or add files")
    return train, evals


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_folder(root: Path, suffix: str | None = None, skip_dirs: tuple[str, ...] = ()) -> list[FileRecord]:
    if not root.exists():
        raise UserError(f"data path not found: {root}")
    if not root.is_dir():
        raise UserError(f"data path is not a folder: {root}")
    records = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part in skip_dirs or part.startswith(".") for part in rel.parts):
            continue
        if not p.is_file() or p.is_symlink() or (suffix and p.suffix != suffix):
            continue  # sockets, fifos, links: only regular files are data
        records.append(FileRecord(rel.as_posix(), p.read_bytes()))
    if not records:
        raise UserError(f"no files found under {root}")
    if not any(r.data for r in records):
        raise UserError(f"every file under {root} is empty ({len(records)} files): no data to read")
    return records


def stdlib_records() -> list[FileRecord]:
    return read_folder(stdlib_root(), suffix=".py", skip_dirs=("site-packages", "dist-packages", "__pycache__"))


def cpu_state_records(n_programs: int = 2000, seed: int = 0, max_program: int = 64) -> list[FileRecord]:
    """Traces drawn as cpu_states.generate draws them (random ACC and registers, as the official random_init),
    with shorter programs (at most max_program instructions) so that a trace fits small models."""
    from bytedeploy.data import cpu_states

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_programs):
        acc = int(rng.integers(0, 256))
        registers = [int(v) for v in rng.integers(0, 256, size=cpu_states.NUM_REGISTERS)]
        program = cpu_states.random_program(rng, int(rng.integers(1, max_program + 1)))
        trace = cpu_states.run_program(program, acc=acc, registers=registers)
        out.append(FileRecord(f"cpu_{i}.bin", trace))
    return out


def load_records(spec: str) -> list[FileRecord]:
    """All files of a data spec (builtin:... or a folder)."""
    if spec == "builtin:stdlib":
        return stdlib_records()
    if spec == "builtin:cpu-states":
        return cpu_state_records()
    if spec.startswith("builtin:"):
        raise UserError(f"unknown built-in data {spec!r}; known: {', '.join(BUILTIN_SOURCES)}")
    return read_folder(Path(spec))


def parse_conversion(mode: str) -> list[tuple[str, str]]:
    """'abc->mid' -> [(abc, mid)]; 'wav&mp3' -> [(wav, mp3), (mp3, wav)] (the seed's syntax)."""
    if "->" in mode:
        src, dst = mode.split("->", 1)
        pairs = [(src, dst)]
    elif "&" in mode:
        a, b = mode.split("&", 1)
        pairs = [(a, b), (b, a)]
    else:
        raise UserError(f"conversion mode {mode!r} must be 'src->dst' or 'a&b'")
    for src, dst in pairs:
        if not src or not dst or src == dst:
            raise UserError(f"conversion mode {mode!r} needs two different extensions")
    return pairs


def conversion_pairs(records: list[FileRecord], mode: str) -> list[tuple[FileRecord, FileRecord]]:
    """Pair files whose paths differ only in extension, for each direction of the mode."""
    by_stem_ext = {(r.stem, r.ext): r for r in records}
    pairs = []
    for src_ext, dst_ext in parse_conversion(mode):
        for (stem, ext), rec in sorted(by_stem_ext.items()):
            if ext == src_ext and (stem, dst_ext) in by_stem_ext:
                pairs.append((rec, by_stem_ext[(stem, dst_ext)]))
    if not pairs:
        raise UserError(f"no file pairs for conversion {mode!r}: pairs must share a path and differ in extension")
    return pairs


def label_of(record: FileRecord) -> str:
    """The seed's classification label: the file name up to its first '_' (Business_1.txt -> Business)."""
    return record.name.rsplit("/", 1)[-1].split("_")[0]
