"""Export one torch module as one bundle graph: ONNX file, full checker pass, GraphSpec for the manifest; and the
pieces every family's step graphs share: static KV caches written in place, per-row masks, the on-device sampler.

We use the TorchScript-based exporter (``dynamo=False``): its ``dynamic_axes`` give the named dynamic batch,
sequence and cache axes the runtimes and TensorRT profiles rely on, and it emits custom-domain nodes from
``torch.autograd.Function.symbolic`` (the BitLinear plugin op).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, GraphSpec, TensorSpec, check_graph_opset_and_ops


def tensor_spec(name: str, value: np.ndarray | torch.Tensor, dynamic: dict[int, str]) -> TensorSpec:
    shape = [dynamic.get(i, int(n)) for i, n in enumerate(value.shape)]
    dtype = str(value.dtype).replace("torch.", "")
    return TensorSpec(name, shape, dtype)


def export_graph(module: torch.nn.Module, name: str, args: tuple, folder: Path, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int,
                 custom_ops: bool = False) -> GraphSpec:
    """Trace module(*args) into folder/onnx/NAME.onnx, check it, and describe it for bundle.json. custom_ops: the
    module emits bytedeploy custom-domain nodes (BitLinear's symbolic)."""
    rel = f"onnx/{name}.onnx"
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with torch.no_grad():
        outputs = module(*args)
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                          custom_opsets={CUSTOM_DOMAIN: 1} if custom_ops else None)
    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):  # pragma: no cover
        # past 2 GB torch writes one file per initializer beside the graph: gather them into NAME.onnx.data
        model = gather_external_data(path, model, f"{name}.onnx.data")
    custom = check_exported(path, name, model)
    return GraphSpec(
        name, rel,
        [tensor_spec(n, a, dynamic_axes.get(n, {})) for n, a in zip(input_names, args)],
        [tensor_spec(n, o, dynamic_axes.get(n, {})) for n, o in zip(output_names, outputs)],
        custom)


def check_exported(path: Path, name: str, model: onnx.ModelProto) -> list[str]:
    """The full ONNX checker and the bundle's rules on a written graph; -> its bytedeploy custom ops."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise UserError(f"exported graph {name} fails the ONNX checker: {str(e).splitlines()[0]}") from None
    check_graph_opset_and_ops(path, model)
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == CUSTOM_DOMAIN})


def gather_external_data(path: Path, model: onnx.ModelProto, location: str) -> onnx.ModelProto:  # pragma: no cover
    stray = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    full = onnx.load(str(path))
    for name in stray:
        (path.parent / name).unlink()
    onnx.save_model(full, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
    return onnx.load(str(path), load_external_data=False)


class ConcatCache:
    """Stand-in for bytedeploy.kv_cache.KVCache inside exported graphs: the new keys and values are appended to
    the past ones (bGPT's byte decoder inside byte_patch, whose caches live and die in one graph call; a graph with
    stacked (L, B, H, T, D) caches that maps pasts to presents one longer)."""

    def __init__(self, past_k: torch.Tensor | None, past_v: torch.Tensor | None):
        self.k, self.v = past_k, past_v

    def update(self, start, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:  # a prefill: no past, the presents are the new keys and values
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k.to(self.k.dtype)], 2)
            self.v = torch.cat([self.v, v.to(self.v.dtype)], 2)
        return self.k, self.v


def layer_caches(past_k: torch.Tensor, past_v: torch.Tensor) -> list[ConcatCache]:
    """Stacked caches (L, B, H, T, D) -> one ConcatCache per layer."""
    return [ConcatCache(past_k[i], past_v[i]) for i in range(past_k.size(0))]


def prefill_caches(n_layer: int) -> list[ConcatCache]:
    """Caches without a past, for a prefill graph that returns its keys and values as presents."""
    return [ConcatCache(None, None) for _ in range(n_layer)]


def stacked(caches: list[ConcatCache]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (present_k, present_v), each (L, B, H, T', D)."""
    return torch.stack([c.k for c in caches]), torch.stack([c.v for c in caches])


def attention_mask(past_row: torch.Tensor | None, new_row: torch.Tensor, dtype: torch.dtype,
                   diagonal: bool = False) -> torch.Tensor:
    """Additive attention mask (T, P + T) for T new queries after P cached entries, built from tensors (no traced
    shape is frozen): every query sees the whole past and, among the new entries, the earlier ones and itself
    (causal), or itself only (diagonal=True). past_row and new_row are any 1-D tensors of length P and T.

    The mask is additive in the model's dtype because the exporter writes boolean (and is_causal) attention masks
    with float32 constants, which turns an fp16 graph into a mixed-type one the ONNX checker rejects."""
    new = torch.ones_like(new_row, dtype=torch.long).cumsum(0)
    allowed = new[:, None] == new[None, :] if diagonal else new[:, None] >= new[None, :]
    if past_row is not None:
        past = torch.ones_like(past_row, dtype=torch.bool)[None, :] & (new[:, None] > 0)
        allowed = torch.cat([past, allowed], 1)
    zero = torch.zeros((), dtype=dtype, device=new_row.device)
    minus_inf = torch.full((), float("-inf"), dtype=dtype, device=new_row.device)
    return torch.where(allowed, zero, minus_inf)


# ----------------------------------------------------------------------------------------------- static caches
#
# The graphs the loops run keep one KV cache buffer per layer, past_k.{i} / past_v.{i} (B, H, T, D), allocated once
# by the loop at the length it needs (T = LENGTH, at most the model's context). A step writes its new keys and
# values at each row's own slots and returns the whole buffer as present_k.{i} / present_v.{i}; the loop binds each
# present to the same runner value as its past, so the write is the only traffic (ScatterElements and ScatterND skip
# their copy when input and output are one buffer, on ONNX Runtime's CPU and CUDA providers alike: ONNX Runtime
# GenAI's past-present-share-buffer, in standard ops). Attention reads the whole buffer under a per-row mask, so the
# rows of a batch may stand at different positions.

# GELU is one ONNX op (Gelu) from opset 20; below, torch writes its tanh form as ~8 ops that no ONNX Runtime fusion
# recognises, each a kernel per layer and step. Graphs with GELU are traced at this opset or newer (export_opset).
GELU_OPSET = 20
LENGTH = "length"  # the static caches' length axis (TensorRT profile: 1 .. the context)
SEQ_AXES = {0: "batch", 1: "len"}  # a loop's token buffer seq (B, N)
INT = torch.int64


def export_opset(opset: int) -> int:
    """The opset a graph with GELU is traced at: the bundle's, raised to GELU_OPSET (exporters return it as
    extra["opset"], which the bundle records)."""
    return max(opset, GELU_OPSET)


def cache_names(n_layer: int, prefix: str = "past") -> list[str]:
    """past_k.0 .. past_k.{L-1}, then past_v.0 .. (prefix "present" for the outputs)."""
    return [f"{prefix}_{kv}.{i}" for kv in "kv" for i in range(n_layer)]


def cache_axes(n_layer: int) -> dict[str, dict[int, str]]:
    return {name: {0: "batch", 2: LENGTH} for prefix in ("past", "present") for name in cache_names(n_layer, prefix)}


def empty_caches(n_layer: int, batch_size: int, n_head: int, length: int, head_dim: int, dtype) -> list[torch.Tensor]:
    """Zero caches for tracing, in cache_names order."""
    return [torch.zeros(batch_size, n_head, length, head_dim, dtype=dtype) for _ in range(2 * n_layer)]


def count_up(like: torch.Tensor) -> torch.Tensor:
    """0, 1, .. len(like) - 1 as int64, counted from a 1-D tensor so that no traced size is frozen."""
    return torch.ones_like(like, dtype=INT).cumsum(0) - 1


class SlotCache:
    """Stand-in for bytedeploy.kv_cache.KVCache in a decode graph: update() writes the new keys and values (B, H, S, D)
    at each row's slots (B, S) of the layer's static cache (ScatterElements along the length) and returns the whole
    cache, which the attention reads under slot_mask."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor):
        self.k, self.v, self.index = k, v, index

    def update(self, start, k: torch.Tensor, v: torch.Tensor):
        self.k = self.k.scatter(2, self.index, k.to(self.k.dtype))
        self.v = self.v.scatter(2, self.index, v.to(self.v.dtype))
        return self.k, self.v


def slot_caches(caches: list[torch.Tensor], slots: torch.Tensor) -> list[SlotCache]:
    """Stacked-by-name caches (cache_names order) and the write slots (B, S) -> one SlotCache per layer."""
    L = len(caches) // 2
    B, H, _, D = caches[0].shape
    index = slots[:, None, :, None].expand(B, H, slots.size(1), D)
    return [SlotCache(caches[i], caches[L + i], index) for i in range(L)]


def slot_mask(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, diagonal: bool = False) -> torch.Tensor:
    """Additive mask (B, 1, S, T) over a static cache (B, H, T, D) for new entries at slots (B, S): each sees the
    slots up to its own (causal), or (diagonal) the slots before the row's first new one and its own."""
    t = count_up(cache[0, 0, :, 0])[None, None, :]
    mine = slots[:, :, None]
    allowed = (t < slots[:, :1, None]) | (t == mine) if diagonal else t <= mine
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype))[:, None]


class RowCache:
    """Stand-in for KVCache in a prefill graph: the S new keys and values of each row are written at slots 0..S-1 of
    cache row rows[b] (ScatterND); attention sees only the new entries (no past)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor):
        self.k, self.v, self.rows = k, v, rows

    def update(self, start, k: torch.Tensor, v: torch.Tensor):
        index = (self.rows[:, None, None], count_up(k[0, :, 0, 0])[None, :, None], count_up(k[0, 0, :, 0])[None, None])
        self.k = self.k.index_put(index, k.to(self.k.dtype))
        self.v = self.v.index_put(index, v.to(self.v.dtype))
        return k, v


def row_caches(caches: list[torch.Tensor], rows: torch.Tensor) -> list[RowCache]:
    L = len(caches) // 2
    return [RowCache(caches[i], caches[L + i], rows) for i in range(L)]


def written(caches) -> list[torch.Tensor]:
    """The caches after the step (SlotCache / RowCache list), in cache_names order: the present_* outputs."""
    return [c.k for c in caches] + [c.v for c in caches]


def take(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """seq (B, N) at each row's position pos (B,), clamped into the row -> (B, 1)."""
    return seq.gather(1, torch.minimum(pos, last_slot(seq))[:, None])


def put(seq: torch.Tensor, pos: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """seq (B, N) with token (B,) written at each row's position pos (B,), clamped into the row (ScatterElements)."""
    return seq.scatter(1, torch.minimum(pos, last_slot(seq))[:, None], token[:, None].to(seq.dtype))


def last_slot(seq: torch.Tensor) -> torch.Tensor:
    """N - 1 for each row of seq (B, N), computed on the device. Not seq.size(1) - 1: ONNX Runtime's CUDA provider
    computes a scalar made from a shape on the CPU and copies it in, and a graph with a copy cannot be captured as
    a CUDA graph."""
    return torch.ones_like(seq).sum(1) - 1


def advance(pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """pos + 1, computed from last (a result of the whole step, e.g. the new tokens): the output that overwrites the
    pos input in place must come after every node that reads pos, and a data dependency is the only order ONNX
    Runtime keeps."""
    return torch.where(last >= 0, pos + 1, pos)


# ----------------------------------------------------------------------------------------------- sampling


SAMPLING_INPUTS = ["u", "temperature", "top_k", "top_p"]  # u: the loop's uniform draws; settings per row


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, V: int) -> torch.Tensor:
    """bytedeploy.sampling.sample inside a graph, with settings per row: logits (N, V), u (N,) uniforms in [0, 1)
    drawn by the loop, temperature, top_k (0 = off), top_p (N,) -> tokens (N,) int64. Top-k, then top-p on the
    temperature-1 distribution of what survives, then temperature, then the inverse of the cumulative distribution at
    u; greedy rows (temperature 0 or top_k 1) take the argmax. V is given, not read from logits' shape: a traced size
    would become a host value that the device's ops read (a copy that keeps the step out of CUDA graphs)."""
    logits = logits.float()
    ranked, order = logits.sort(-1, descending=True)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V)).clamp(max=V)
    kth = ranked.gather(1, (k - 1)[:, None])
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = ranked.softmax(-1)
    drop_ranked = (probs.cumsum(-1) - probs) >= top_p[:, None]  # keep the token that crosses top_p
    drop = torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked) | (logits < kth)
    scaled = logits.masked_fill(drop, float("-inf")) / temperature.clamp(min=1e-8)[:, None]
    cdf = scaled.softmax(-1).cumsum(-1)
    drawn = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1).clamp(max=V - 1)
    greedy = (temperature == 0) | (top_k == 1)
    return torch.where(greedy, logits.argmax(-1), drawn)


def sampling_example(batch_size: int) -> tuple[torch.Tensor, ...]:
    """Example sampling inputs for tracing (u, temperature, top_k, top_p)."""
    return (torch.full((batch_size,), 0.5), torch.ones(batch_size), torch.zeros(batch_size, dtype=INT),
            torch.ones(batch_size))


class SampleInto(nn.Module):
    """The "sample" graph: one token per row from logits (B, V) with the row's settings and uniform, written into
    seq (B, N) at the row's position pos (B,); transform(logits) runs first (char GPT-2's unknown symbol)."""

    def __init__(self, vocab_size: int, transform=None):
        super().__init__()
        self.vocab_size, self.transform = vocab_size, transform

    def forward(self, logits, u, temperature, top_k, top_p, seq, pos):
        logits = self.transform(logits) if self.transform else logits
        return put(seq, pos, sample_tokens(logits, u, temperature, top_k, top_p, self.vocab_size))


def export_sample_graph(folder: Path, vocab_size: int, dtype: torch.dtype, opset: int, transform=None) -> GraphSpec:
    B, N = 2, 5
    args = (torch.zeros(B, vocab_size, dtype=dtype), *sampling_example(B), torch.zeros(B, N, dtype=INT),
            torch.tensor([1, 3]))
    names = ["logits", *SAMPLING_INPUTS, "seq", "pos"]
    axes = {name: {0: "batch"} for name in names}
    axes["seq"] = axes["seq_out"] = SEQ_AXES
    return export_graph(SampleInto(vocab_size, transform), "sample", args, folder, names, ["seq_out"], axes, opset)


# ----------------------------------------------------------------------------------------------- token step graphs
#
# The step graphs of the families that write one token per step (char GPT-2, BitNet):
#
#   prefill  tokens (b, S) at positions 0..S-1, rows (b,), past_k.i / past_v.i (B, H, T, D)
#            -> logits (b, V) of the last token; the rows' keys and values written at slots 0..S-1 of cache rows
#               `rows` (present_k.i / present_v.i, in place)
#   decode   seq (B, N) the tokens so far, pos (B,) each row's position, past caches
#            -> logits (B, V) of the token at seq[b, pos[b]], written at its position's slot; seq_out: seq with the
#               argmax of the (transformed) logits at pos + 1; pos_out = pos + 1; present caches (in place)
#   sample   (SampleInto) a token per row drawn from logits, written into seq at pos
#
# A greedy loop runs decode alone, step after step, all on the device; a sampling loop runs sample after it, with
# the step's uniforms. seq_out may overwrite seq in place (the step writes the same token there however often it
# runs); pos_out must go to another buffer than pos (runtimes/windowed.py alternates two).

TOKEN_PREFILL_INPUTS, TOKEN_DECODE_INPUTS = ["tokens", "rows"], ["seq", "pos"]


class TokenPrefill(nn.Module):
    """step(model, tokens (b, S), positions (1, S), caches, mask) -> logits (b, S, V): the family's forward pass."""

    def __init__(self, model: nn.Module, step, dtype: torch.dtype):
        super().__init__()
        self.model, self.step, self.dtype = model, step, dtype

    def forward(self, tokens, rows, *caches):
        written_caches = row_caches(list(caches), rows)
        positions = count_up(tokens[0])[None]
        logits = self.step(self.model, tokens, positions, written_caches,
                           attention_mask(None, tokens[0], self.dtype))
        return (logits[:, -1], *written(written_caches))


class TokenDecode(nn.Module):
    """One token per row at the row's own position, from seq, onto seq (see above)."""

    def __init__(self, model: nn.Module, step, dtype: torch.dtype, transform=None):
        super().__init__()
        self.model, self.step, self.dtype, self.transform = model, step, dtype, transform

    def forward(self, seq, pos, *caches):
        at = torch.minimum(pos, count_up(caches[0][0, 0, :, 0])[-1])[:, None]  # a slot inside the cache
        step_caches = slot_caches(list(caches), at)
        logits = self.step(self.model, take(seq, pos), at, step_caches,
                           slot_mask(caches[0], at, self.dtype))[:, -1]
        scored = self.transform(logits) if self.transform else logits
        return (logits, put(seq, pos + 1, scored.argmax(-1)), pos + 1, *written(step_caches))


def export_token_graphs(model: nn.Module, step, folder: Path, n_layer: int, n_head: int, head_dim: int, vocab_size: int,
                        dtype: torch.dtype, opset: int, transform=None, custom_ops: bool = False) -> list[GraphSpec]:
    """prefill, decode and sample graphs of a token family (see above) from its step function
    step(model, tokens, positions, caches, mask) -> logits (B, S, V)."""
    B, T, N, S = 2, 6, 7, 3
    caches = empty_caches(n_layer, B, n_head, T, head_dim, dtype)
    past, present = cache_names(n_layer), cache_names(n_layer, "present")
    axes = cache_axes(n_layer)
    tokens = torch.arange(B * S).view(B, S) % vocab_size
    prefill = export_graph(
        TokenPrefill(model, step, dtype), "prefill", (tokens, torch.tensor([1, 0]), *caches), folder,
        [*TOKEN_PREFILL_INPUTS, *past], ["logits", *present],
        {"tokens": {0: "batch", 1: "seq"}, "rows": {0: "batch"}, "logits": {0: "batch"}, **axes}, opset, custom_ops)
    seq = torch.arange(B * N).view(B, N) % vocab_size
    decode = export_graph(
        TokenDecode(model, step, dtype, transform), "decode", (seq, torch.tensor([2, 4]), *caches), folder,
        [*TOKEN_DECODE_INPUTS, *past], ["logits", "seq_out", "pos_out", *present],
        {"seq": SEQ_AXES, "seq_out": SEQ_AXES, "pos": {0: "batch"}, "pos_out": {0: "batch"}, "logits": {0: "batch"},
         **axes}, opset, custom_ops)
    return [prefill, decode, export_sample_graph(folder, vocab_size, dtype, opset, transform)]
