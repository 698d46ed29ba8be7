"""bytedeploy.exporters: checkpoint -> deployment bundle (ONNX graphs + manifest + tokenizer assets).

Each family has one module here, exporters/<family>.py, providing

    export_graphs(model, cfg, folder: Path, precision: str, bitlinear: str | None, opset: int)
        -> (list[GraphSpec], extra: dict)

which writes folder/onnx/*.onnx through onnx_graphs.export_graph and returns the graphs and any facts its runtime
loop needs (stored as bundle.json "extra").
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bytedeploy.errors import UserError
from bytedeploy.registry import family_module

EXPORTERS = {
    "bgpt": "bytedeploy.exporters.bgpt",
    "bitnet": "bytedeploy.exporters.bitnet",
    "sigma-gpt": "bytedeploy.exporters.sigma_gpt",
    "bfn": "bytedeploy.exporters.bfn",
    "char-gpt2": "bytedeploy.exporters.char_gpt2",
}


def max_opset() -> int:
    """The newest opset torch's TorchScript-based exporter writes (20 in torch 2.4, 23 in 2.11)."""
    from torch.onnx import _constants

    return getattr(_constants, "ONNX_MAX_OPSET", 20)


def family_exporter(family: str):
    return family_module(EXPORTERS, family, f"no exporter for family {family!r}")


def export(checkpoint: str | Path, out: str | Path, precision: str = "fp32", bitlinear: str | None = None,
           opset: int | None = None, force: bool = False, patch_decode: str | None = None, ort_fusions: bool = False):
    """Write the bundle for checkpoint into out (atomically); returns the Bundle. patch_decode "plugin" (bGPT only)
    adds the patch_decode_fused graph (exporters/bgpt.py); ort_fusions adds each graph's ONNX Runtime variant with
    contrib-op fusions, where any applies (exporters/ort_fusions.py)."""
    import torch

    from bytedeploy.checkpoint import load_model
    from bytedeploy.config import config_to_dict
    from bytedeploy.exporters.bundle import DEFAULT_OPSET, MIN_OPSET, PRECISIONS, StagedBundle, write_manifest
    from bytedeploy.staging import write_error

    opset = opset or DEFAULT_OPSET
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is too old; bytedeploy exports opset {MIN_OPSET} or newer")
    if opset > max_opset():
        raise UserError(f"opset {opset} is newer than this torch's ONNX exporter writes (up to {max_opset()})")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    model, cfg, ckpt = load_model(checkpoint, "cpu")
    exporter = family_exporter(ckpt.family)
    if bitlinear is not None and ckpt.family != "bitnet":
        raise UserError(f"--bitlinear applies to bitnet checkpoints; this one is {ckpt.family}")
    if patch_decode is not None and ckpt.family != "bgpt":
        raise UserError(f"--patch-decode applies to bgpt checkpoints; this one is {ckpt.family}")
    options = {} if patch_decode is None else {"patch_decode": patch_decode}  # only bgpt's exporter takes it
    if precision == "fp16":
        model = model.half()
    try:
        with StagedBundle(out, force) as folder:
            if ckpt.assets.is_dir():
                shutil.copytree(ckpt.assets, folder / "assets")
            with torch.no_grad():
                graphs, extra = exporter.export_graphs(model, cfg, folder, precision, bitlinear, opset, **options)
            if ort_fusions:
                from bytedeploy.exporters.ort_fusions import add_ort_variants

                add_ort_variants(folder, graphs)
            # A family may raise the opset (BitNet qdq: INT4 DequantizeLinear needs 21) and resolve the bitlinear
            # default.
            opset, bitlinear = extra.pop("opset", opset), extra.pop("bitlinear", bitlinear)
            if ckpt.family == "bgpt" and "data_options" in ckpt.meta:  # what generate --input/--to may ask of it
                extra["conversion"] = ckpt.meta["data_options"].get("conversion")
            bundle = write_manifest(folder, ckpt.family, config_to_dict(cfg), graphs, opset, precision, bitlinear,
                                    extra)
    except OSError as e:  # a full disk, a folder that cannot be written
        raise UserError(f"cannot write the bundle {out}: {write_error(e)}; {out} is as it was") from None
    bundle.path = Path(out)
    return bundle
