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
from bytedeploy.exporters.bundle import CUSTOM_DOMAIN, CUSTOM_OPS, GraphSpec, TensorSpec

TWO_GB = 2 * 1024**3


def tensor_spec(name: str, value: np.ndarray | torch.Tensor, dynamic: dict[int, str]) -> TensorSpec:
    shape = [dynamic.get(i, int(n)) for i, n in enumerate(value.shape)]
    dtype = str(value.dtype).replace("torch.", "")
    return TensorSpec(name, shape, dtype)


def export_graph(module: torch.nn.Module, name: str, args: tuple, folder: Path, input_names: list[str],
                 output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int) -> GraphSpec:
    """Trace module(*args) into folder/onnx/NAME.onnx, check it, and describe it for bundle.json."""
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
                          custom_opsets={CUSTOM_DOMAIN: 1})
    model = onnx.load(str(path), load_external_data=False)
    if sum(t.ByteSize() for t in model.graph.initializer) >= TWO_GB:  # pragma: no cover - only for huge models
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location=f"{name}.onnx.data")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise UserError(f"exported graph {name} fails the ONNX checker: {str(e).splitlines()[0]}") from None
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == CUSTOM_DOMAIN})
    for op in custom:
        assert op.split("::")[1] in CUSTOM_OPS, op
    return GraphSpec(
        name, rel,
        [tensor_spec(n, a, dynamic_axes.get(n, {})) for n, a in zip(input_names, args)],
        [tensor_spec(n, o, dynamic_axes.get(n, {})) for n, o in zip(output_names, outputs)],
        custom)


class ConcatCache:
    """Stand-in for bytedeploy.kv_cache.KVCache inside exported graphs: the new keys and values are appended to
    the past ones, so a decode graph maps (past_k, past_v) of any length to (present_k, present_v) one longer.
    Runtimes feed each step's presents back as the next step's pasts (ORT values stay on the device)."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.k, self.v = past_k, past_v

    def update(self, start, k: torch.Tensor, v: torch.Tensor):
        self.k = torch.cat([self.k, k.to(self.k.dtype)], 2)
        self.v = torch.cat([self.v, v.to(self.v.dtype)], 2)
        return self.k, self.v


def layer_caches(past_k: torch.Tensor, past_v: torch.Tensor) -> list[ConcatCache]:
    """Stacked caches (L, B, H, T, D) -> one ConcatCache per layer."""
    return [ConcatCache(past_k[i], past_v[i]) for i in range(past_k.size(0))]


def stacked(caches: list[ConcatCache]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (present_k, present_v), each (L, B, H, T', D)."""
    return torch.stack([c.k for c in caches]), torch.stack([c.v for c in caches])
