"""bGPT without torch: the model config, the file encoding into patches and generation planning
(bytedeploy.models.bgpt is the model, runtimes/bgpt.py the bundle loop).

File encoding: [BOS patch = extension bytes padded with 256] + [file bytes padded with 256 to a whole patch]
+ [EOS patch = 16 x 256], at most n_patches patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest

SPECIAL = 256  # pad, BOS filler and EOS
N_SYMBOLS = 257
UNIT = "byte"
FUSED = "patch_decode_fused"  # the bundle graph that decodes a whole patch in one call (exporters/bgpt.py)


@dataclass
class Config:
    patch_size: int = 16  # PATCH_SIZE
    n_patches: int = 512  # PATCH_LENGTH, BOS and EOS patches included
    n_embd: int = 768
    n_layer: int = 12  # patch-level decoder
    n_head: int = 12
    byte_n_layer: int = 3
    byte_n_head: int = 12
    dropout: float = 0.0
    patch_sampling_batch_size: int = 0  # train the byte decoder on this many random patches per batch; 0 = all
    task: str = "generate"  # "generate" or "classify"
    labels: tuple = ()  # class names, for task == "classify"

    def __post_init__(self):
        if self.patch_size < 1 or self.n_patches < 3:
            raise ValueError(f"need patch_size >= 1 and n_patches >= 3 (BOS, content, EOS), "
                             f"got {self.patch_size} and {self.n_patches}")
        if self.task not in ("generate", "classify"):
            raise ValueError(f"task must be 'generate' or 'classify', got {self.task!r}")
        if self.task == "classify" and len(self.labels) < 2:
            raise ValueError("classification needs at least two labels")
        if self.n_embd % self.n_head or self.n_embd % self.byte_n_head:
            raise ValueError(f"n_embd {self.n_embd} must divide by n_head {self.n_head} and byte_n_head")

    @property
    def max_bytes(self) -> int:
        """File bytes that fit beside the BOS and EOS patches."""
        return (self.n_patches - 2) * self.patch_size


PRESETS = {
    "tiny": dict(n_patches=64, n_embd=128, n_layer=3, n_head=4, byte_n_layer=2, byte_n_head=4,
                 patch_sampling_batch_size=256),
    "small": dict(n_patches=256, n_embd=384, n_layer=6, n_head=6, byte_n_layer=2, byte_n_head=6),
    "base": dict(),  # the paper's: 12 + 3 layers, hidden 768, patch 16, 512 patches, ~110M parameters
}


# ----------------------------------------------------------------------------------------------- encoding


def ext_patch(ext: str, patch_size: int) -> np.ndarray:
    b = list(ext.encode("utf-8"))[:patch_size]
    return np.array(b + [SPECIAL] * (patch_size - len(b)), dtype=np.int64)


def bytes_to_patches(data: bytes, patch_size: int) -> np.ndarray:
    """File bytes padded with 256 to whole patches -> (n, patch_size)."""
    arr = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    n = -(-len(arr) // patch_size)
    out = np.full(n * patch_size, SPECIAL, dtype=np.int64)
    out[:len(arr)] = arr
    return out.reshape(n, patch_size)


def encode_file(data: bytes, ext: str, cfg: Config, eos: bool = True, truncate: bool = False) -> np.ndarray:
    """The bGPT file encoding -> (n_patches_used, patch_size) int64 in 0..256."""
    if not truncate and len(data) > cfg.max_bytes:
        raise UserError(f"file of {len(data)} bytes exceeds the model's limit of {cfg.max_bytes} bytes "
                        f"({cfg.n_patches} patches of {cfg.patch_size})")
    parts = [ext_patch(ext, cfg.patch_size)[None], bytes_to_patches(data, cfg.patch_size)]
    if eos:
        parts.append(np.full((1, cfg.patch_size), SPECIAL, dtype=np.int64))
    return np.concatenate(parts)[:cfg.n_patches]


def conversion_prompt(data: bytes, src_ext: str, dst_ext: str, cfg: Config, truncate: bool = False) -> np.ndarray:
    """Conversion input: the source encoding without its EOS patch, then the target extension's BOS patch."""
    src = encode_file(data, src_ext, cfg, eos=False, truncate=truncate)
    return np.concatenate([src, ext_patch(dst_ext, cfg.patch_size)[None]])


def patches_to_bytes(patches) -> bytes:
    """Generated patches -> file bytes: everything before the first 256."""
    flat = np.asarray(patches).reshape(-1)
    stop = np.flatnonzero(flat == SPECIAL)
    return bytes(flat[:stop[0] if len(stop) else len(flat)].astype(np.uint8).tolist())


# ----------------------------------------------------------------------------------------------- generation


def make_prompt(cfg: Config, request: GenerateRequest) -> tuple[np.ndarray, np.ndarray]:
    """-> (whole prompt patches (n0, P), forced bytes that begin the first new patch (k,) with k < P).

    options: ext (of the file to generate, default 'txt'); input (a file to convert) or input_data (its bytes) with
    input_ext, and target_ext."""
    opts = request.options
    if opts.get("input") or opts.get("input_data") is not None:
        data, ext = conversion_input(opts)
        if not opts.get("target_ext"):
            raise UserError("conversion needs --to EXT, the extension of the file to produce")
        return conversion_prompt(data, ext, opts["target_ext"], cfg), np.zeros(0, dtype=np.int64)
    prompt = request.prompt
    if len(prompt) > cfg.max_bytes:
        raise UserError(f"prompt of {len(prompt)} bytes exceeds the model's limit of {cfg.max_bytes} bytes")
    n_whole = len(prompt) // cfg.patch_size * cfg.patch_size
    whole = encode_file(prompt[:n_whole], opts.get("ext", "txt"), cfg, eos=False)
    tail = np.frombuffer(prompt[n_whole:], dtype=np.uint8).astype(np.int64)
    return whole, tail


def conversion_input(opts: dict) -> tuple[bytes, str]:
    """The file to convert and its extension: options input_data (bytes) with input_ext, or input (a path)."""
    if opts.get("input_data") is not None:
        return opts["input_data"], opts.get("input_ext") or ""
    src = Path(opts["input"])
    if not src.is_file():
        raise UserError(f"input file not found: {src}")
    return src.read_bytes(), src.suffix.lstrip(".")


def plan_generation(cfg: Config, request: GenerateRequest) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (the prompt's whole patches, its partial last patch's bytes, the most patches to generate); every backend
    plans the same way."""
    patches, tail = make_prompt(cfg, request)
    if len(patches) >= cfg.n_patches:
        raise UserError(f"the prompt fills all {cfg.n_patches} patches; nothing is left to generate")
    max_patches = cfg.n_patches - len(patches)
    if request.max_new:
        max_patches = min(max_patches, -(-(request.max_new + len(tail)) // cfg.patch_size))
    return patches, tail, max_patches
