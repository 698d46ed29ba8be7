"""Export one torch module as one bundle graph: ONNX file, full checker pass, GraphSpec for the manifest.

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

from bytedeploy.errors import UserError
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, GraphSpec, TensorSpec, check_graph_opset_and_ops

# Dynamic axes of the stacked KV caches (n_layer, batch, heads, length, head_dim): the past fed in, the present out.
CACHE_AXES = {1: "batch", 3: "past"}
PRESENT_AXES = {1: "batch", 3: "total"}


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
    the past ones, so a decode graph maps (past_k, past_v) of any length to (present_k, present_v) one longer.
    Runtimes feed each step's presents back as the next step's pasts (ORT values stay on the device)."""

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


def cache_arrays(caches, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Eager KVCache list -> stacked (L, B, H, n, D) numpy copies of the first n positions: verify's past / present
    values."""
    return (torch.stack([c.k[:, :, :n] for c in caches]).cpu().numpy().copy(),
            torch.stack([c.v[:, :, :n] for c in caches]).cpu().numpy().copy())


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
