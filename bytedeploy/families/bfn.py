"""The Bayesian-flow LM without torch: the model config, its sentencepiece tokenizer, generation planning (prompt or
infill template on the fixed-length sequence), the accuracy schedule and the Gaussian noise of the Bayesian
update (bytedeploy.models.bfn is the network and its eager loops, runtimes/bfn.py the bundle loop).

The update noise: every backend (eager, eager-reference, the bundle loop, native) computes it from a counter-based
generator (update_noise here in numpy, bytedeploy.models.bfn.update_noise in torch, on the step's device) whose bits
are the same everywhere, so that the same seed sees the same noise on every backend and greedy tokens agree wherever
the networks' outputs do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import numpy as np

from bytedeploy.data.sentencepiece_tokenizer import load_sentencepiece, read_model_file
from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest

UNIT = "token"
TOKENIZER_FILE = "tokenizer.model"
PAPER_K, PAPER_BETA_1 = 27, 0.75  # the paper's text8 setting


@dataclass
class Config:
    vocab_size: int = 8000  # K; the size of a tokenizer trained on the corpus, then set from the tokenizer
    seq_len: int = 64  # fixed sequence length (the seed's)
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 1024
    time_dim: int = 128  # Fourier features and MLP width of the time embedding (the seed's 128)
    beta_1: float = 0.0  # 0 = matched_beta_1(vocab_size); prepare_config writes the number
    dropout: float = 0.1
    n_steps: int = 1000  # sampling steps (the seed samples with 1000)
    conditioning: bool = True  # train with the seed's random conditioning masks (prompts need them)

    def __post_init__(self):
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must divide by n_head {self.n_head} into even head sizes")
        if self.seq_len < 2 or self.time_dim < 2 or self.time_dim % 2:
            raise ValueError("seq_len must be >= 2 and time_dim even")
        if self.beta_1 < 0 or self.n_steps < 1 or self.vocab_size < 0:
            raise ValueError("beta_1 must be >= 0, n_steps >= 1, vocab_size >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def beta(self) -> float:
        """beta(1), the accuracy at t = 1."""
        return self.beta_1 or matched_beta_1(self.vocab_size)


PRESETS = {
    "tiny": dict(vocab_size=256, seq_len=32, n_embd=64, n_layer=2, n_head=2, time_dim=32, dropout=0.0, n_steps=100),
    "small": dict(vocab_size=2048, seq_len=64, n_embd=256, n_layer=8, n_head=8, dropout=0.1),
    "base": dict(),  # the seed's: 8 layers, 8 heads, width 1024, sequence 64, 1000 sampling steps
}


def matched_beta_1(K: int) -> float:
    """beta(1) for K classes at which theta(1) = softmax(y) puts its argmax on a wrong class as often as in the
    paper's text8 setting. y_x - y_j ~ N(beta K, 2 beta K), so a given wrong j wins with probability
    1 - Phi(sqrt(beta K / 2)); summed over the K - 1 wrong classes (union bound) that is ~0.019 for text8."""
    if K < 2:
        raise ValueError(f"vocab_size {K} is unset: prepare_config fills it from the tokenizer")
    normal = NormalDist()
    miss = (PAPER_K - 1) * (1 - normal.cdf(math.sqrt(PAPER_BETA_1 * PAPER_K / 2)))
    z = normal.inv_cdf(1 - miss / (K - 1))
    return 2 * z * z / K


# ----------------------------------------------------------------------------------------------- generation


def tokenizer_bytes(options: dict) -> bytes | None:
    """The checkpoint's tokenizer (options["assets"]), else a --tokenizer file; None when neither is given."""
    if options.get("assets"):  # a checkpoint's: the model was trained with exactly this one
        path = Path(options["assets"]) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"checkpoint has no sentencepiece tokenizer: {path} is missing")
        return path.read_bytes()
    if options.get("tokenizer"):
        return read_model_file(options["tokenizer"])
    return None


def request_tokenizer(request: GenerateRequest):
    data = tokenizer_bytes(request.options)
    if data is None:
        raise UserError("bfn generation needs the checkpoint's tokenizer (options['assets'])")
    return load_sentencepiece(data)


def parse_infill(template: str) -> list:
    """'def [[4]](self):' -> ['def ', 4, '(self):']: text to keep and hole sizes in tokens (options["infill"])."""
    parts = re.split(r"\[\[(\d+)\]\]", template)
    out = [int(p) if i % 2 else p for i, p in enumerate(parts) if i % 2 or p]
    if not any(isinstance(p, int) for p in out):
        raise UserError("an infill template needs at least one hole written [[N]] (N tokens to fill)")
    if any(isinstance(p, int) and p < 1 for p in out):
        raise UserError("infill holes need N >= 1 tokens")
    return out


def build_sequence(cfg: Config, request: GenerateRequest, sp) -> tuple[list[int], list[bool], slice]:
    """-> (token ids, fixed flags) over the used positions, and the slice of positions the output returns."""
    template = request.options.get("infill")
    if template:
        if request.prompt:
            raise UserError("give either a prompt or an infill template, not both")
        ids: list[int] = []
        fixed: list[bool] = []
        for part in template:
            if isinstance(part, str):
                piece = sp.encode(part)
                ids += piece
                fixed += [True] * len(piece)
            elif isinstance(part, int) and not isinstance(part, bool) and part > 0:
                ids += [0] * part
                fixed += [False] * part
            else:
                raise UserError(f"infill template parts are text or hole sizes > 0, got {part!r}")
        if len(ids) > cfg.seq_len:
            raise UserError(f"the infill template takes {len(ids)} tokens; the model's sequence has {cfg.seq_len}")
        return ids, fixed, slice(0, len(ids))
    try:
        prompt = sp.encode(request.prompt.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt is not valid UTF-8: byte 0x{request.prompt[e.start]:02x} at offset {e.start}") \
            from None
    room = cfg.seq_len - len(prompt)
    if room < 1:
        raise UserError(f"the prompt takes {len(prompt)} tokens; the model's sequence has {cfg.seq_len}")
    max_new = request.max_new or room
    if max_new > room:
        raise UserError(f"--max-new {max_new} does not fit: the sequence has {cfg.seq_len} tokens and the prompt "
                        f"takes {len(prompt)}, leaving {room}")
    return prompt, [True] * len(prompt), slice(len(prompt), len(prompt) + max_new)


def sampling_steps(cfg: Config, request: GenerateRequest) -> int:
    """The request's n_steps option, else the model's; every backend reads it here."""
    n_steps = int(request.options.get("n_steps") or cfg.n_steps)
    if n_steps < 1:
        raise UserError(f"the Bayesian-flow sampler needs at least 1 step, not {n_steps}")
    return n_steps


@dataclass
class Plan:
    """A generate request laid out on the model's seq_len positions (every backend samples from one)."""
    ids: list[int]  # prompt / template tokens, 0 elsewhere; seq_len long
    fixed: list[bool]  # positions the sampler keeps (conditioning); seq_len long
    out: slice  # the positions returned
    n_steps: int
    n_new: int  # sampled tokens per row inside out


def plan_generation(cfg: Config, request: GenerateRequest, sp) -> Plan:
    if sp.vocab_size() != cfg.vocab_size:
        raise UserError(f"the tokenizer has {sp.vocab_size()} pieces, the model {cfg.vocab_size}")
    ids, fixed, out = build_sequence(cfg, request, sp)
    pad = cfg.seq_len - len(ids)  # positions after the used ones are sampled too: the network knows L tokens
    n_new = sum(not f for f in fixed[out]) if request.options.get("infill") else out.stop - out.start
    return Plan(ids + [0] * pad, fixed + [False] * pad, out, sampling_steps(cfg, request), n_new)


def step_alpha(beta_1: float, i: int, n_steps: int) -> float:
    return beta_1 * (2 * i - 1) / n_steps**2


# ----------------------------------------------------------------------------------------------- update noise
#
# The Bayesian update's N(0, 1) noise, the same bits in numpy (update_noise here: the bundle loop) and in torch on the
# CPU and on CUDA (bytedeploy.models.bfn.update_noise: eager, eager-reference and native, there inside the CUDA graph),
# computed where the step runs. A counter-based generator: element e = position * K + token of a row, at a step:
#     x = (e * multiplier + offset) mod 2^31     the row's and step's keys (noise_keys)
#     h = mix31(x)                               3 rounds of x <- bits 15..45 of (x + c)^2
#     z = A[h >> 19] + ((h >> 7) mod 4096) * S[h >> 19]      the inverse-CDF table (normal_table)
# Integers: int64 Mul, Add, right shifts and masks of non-negative values, every product below 2^63, so nothing wraps
# and numpy, torch and ONNX agree exactly. In ONNX these are Mul, Add, Div by 2^s and Mod 2^s on int64 (BitShift
# takes only unsigned types), all implemented by ONNX Runtime's CUDA execution provider, which has no BitShift,
# BitwiseAnd or BitwiseXor kernel: hence squares, not xor-shifts, in the hash. Floats: the product f * S is exact
# (f has at most 12 significant bits, S 11), so the final Add rounds once, and an FMA (torch.compile, TensorRT fusing
# the Mul into the Add) gives the same bits.
#
# The approximation: z is a piecewise-linear inverse normal CDF over 4096 bins of equal probability (knots at
# Phi^-1(j / 4096)), each sampled at 4096 equally spaced points: 2^24 equally likely values. Their distribution is
# within 3.5e-5 of N(0, 1) in Kolmogorov-Smirnov distance (mean 5e-8, variance 1.00005), and it truncates the tails:
# the outer bins run linearly from Phi^-1(1/4096) = 3.487 to 3.991 (the end chosen so that the bin's mean is the
# normal's tail mean, 3.739), so |z| <= 3.992, where N(0, 1) has 6.6e-5 of its mass beyond 3.991.

NOISE_MASK = (1 << 31) - 1  # counters and hashes are 31-bit
# Below 2^29, so that (x + c)^2 < 2^63: the golden ratio's and murmur3's 32-bit constants, top bits cleared.
MIX_CONSTANTS = (0x1E3779B9, 0x1B873593, 0x05EBCA6B)
NOISE_BINS = 4096  # inverse-CDF bins, from the hash's top 12 bits; its next 12 bits place z inside the bin


def mix31(x):
    """A 31-bit hash of x in [0, 2^31): Python ints, numpy int64 arrays and torch int64 tensors alike. Three rounds of
    the middle bits of a square (nonlinear without xor); each output bit flips with probability 0.5 +- 0.006 when an
    input bit flips (measured on 1e5 inputs)."""
    for constant in MIX_CONSTANTS:  # in place after the first op: half the time of fresh temporaries on the CPU
        x = x + constant
        x *= x
        x >>= 15
        x &= NOISE_MASK
    return x


def noise_keys(seed: int, batch_size: int, n_steps: int) -> np.ndarray:
    """(n_steps, batch_size, 2) int64: (offset, multiplier) of each step's noise, for rows 0..B-1 of a request with
    this seed (its low 62 bits). A row's noise depends only on its request's seed and its row in that request, never
    on the other rows of a batch: a server batching requests concatenates their keys along axis 1."""
    request = mix31((mix31(seed & NOISE_MASK) + ((seed >> 31) & NOISE_MASK)) & NOISE_MASK)
    rows = mix31((request + np.arange(batch_size)) & NOISE_MASK)
    offsets = mix31((rows + mix31(np.arange(1, n_steps + 1))[:, None]) & NOISE_MASK)
    return np.stack([offsets, 2 * mix31(offsets) + 1], axis=-1)


def noise_elements(seq_len: int, vocab_size: int) -> int:
    """Elements of a row's noise, counted by e < 2^31 so that e * multiplier (< 2^32) stays below 2^63."""
    n = seq_len * vocab_size
    if n >= 1 << 31:
        raise ValueError(f"seq_len * vocab_size = {n} is too large for the update noise's 31-bit counters")
    return n


def noise_bins(offset, multiplier, index):
    """Element counters index -> (inverse-CDF bin, position in the bin 0..4095), int64 numpy arrays or torch tensors
    (offset and multiplier broadcast against index)."""
    x = index * multiplier
    x += offset
    x &= NOISE_MASK
    h = mix31(x)
    fraction = h >> 7
    fraction &= NOISE_BINS - 1
    return h >> 19, fraction


@lru_cache(maxsize=1)
def normal_table() -> tuple[np.ndarray, np.ndarray]:
    """(A, S) float32 (NOISE_BINS,): z = A[bin] + f * S[bin] at f = 0..4095 (the comment above). Built in float64:
    S rounded to 11 significant bits (so that f * S is exact), A = the bin's first knot + S / 2 (f's point sits at
    the middle of its 1/4096 of the bin)."""
    normal = NormalDist()
    inner = np.array([normal.inv_cdf(j / NOISE_BINS) for j in range(1, NOISE_BINS)])
    outer = 2 * (-normal.pdf(inner[0]) * NOISE_BINS) - inner[0]  # the outer bin's mean is E[Z | Z < inner[0]]
    knots = np.concatenate([[outer], inner, [-outer]])
    mantissa, exponent = np.frexp(np.diff(knots) / NOISE_BINS)
    slope = np.ldexp(np.round(mantissa * 2**11) / 2**11, exponent)
    return (knots[:-1] + slope / 2).astype(np.float32), slope.astype(np.float32)


def update_noise(keys: np.ndarray, seq_len: int, vocab_size: int) -> np.ndarray:
    """keys (B, 2): a step's rows of noise_keys -> that step's N(0, 1) noise (B, L, K) float32."""
    index = np.arange(noise_elements(seq_len, vocab_size))
    start, slope = normal_table()
    out = np.empty((len(keys), index.size), dtype=np.float32)
    for row, (offset, multiplier) in zip(out, keys):  # a row at a time: int64 temporaries stay in cache, 2x faster
        bins, fraction = noise_bins(offset, multiplier, index)
        row[:] = start[bins] + fraction.astype(np.float32) * slope[bins]
    return out.reshape(len(keys), seq_len, vocab_size)
