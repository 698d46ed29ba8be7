"""BitNet without torch: the model config, byte prompts and BitLinear's quantization constants
(bytedeploy.models.bitnet is the model, runtimes/bitnet.py the bundle loop)."""

from __future__ import annotations

from dataclasses import dataclass

UNIT = "byte"
DEFAULT_MAX_NEW = 256
EMPTY_PROMPT = b"\n"

# BitLinear's quantization (bytedeploy.models.bitlinear; the exporters and the ONNX Runtime op in plugins/ort_ops.py
# compute the same): weight modes, the int8 activation range, the scales' clamp and the 2-bit packing.
MODES = ("b1.58", "b1")  # the weight quantizers
FP_MODE = "fp"  # the full-precision twin: the same blocks, every BitLinear a plain linear layer (no quantizers);
#                 a training baseline (benchmarks/fidelity.py), with no integer weights to export
ACT_QMAX = 127.0
EPS = 1e-5  # clamp of the absmax / absmean scales (the reference code's)
PACK_SHIFTS = (0, 2, 4, 6)  # value i of a group of 4 lives in bits 2i..2i+1


@dataclass
class Config:
    vocab_size: int = 256  # bytes
    block_size: int = 512  # context length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    ffn_hidden: int = 1024  # SwiGLU width (about 8/3 n_embd)
    mode: str = "b1.58"  # "b1.58" ternary weights, "b1" binary weights, or "fp" the full-precision twin
    rope_theta: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self):
        if self.vocab_size != 256:
            raise ValueError(f"BitNet here models bytes: vocab_size must be 256, got {self.vocab_size}")
        if self.mode not in (*MODES, FP_MODE):
            raise ValueError(f"mode must be one of {(*MODES, FP_MODE)}, got {self.mode!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must divide by n_head {self.n_head} into an even head size")
        if self.block_size < 1 or self.ffn_hidden < 1:
            raise ValueError("block_size and ffn_hidden must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS = {
    "tiny": dict(block_size=128, n_layer=2, n_head=4, n_embd=128, ffn_hidden=352),
    "small": dict(block_size=512, n_layer=6, n_head=6, n_embd=384, ffn_hidden=1024),
}
