"""The C++ TensorRT plugins (libbytedeploy_trt_plugins.so) against the Triton kernels they stand in for, in one run.

    python -m bytedeploy.benchmarks.trt_plugins --out benchmarks/results/h100-trt-plugins.json

Builds the library for this GPU (plugins/build_trt.py) and the harness (plugins/trt/harness.cpp; TensorRT's headers
as build_trt finds them, e.g. TensorRT_INCLUDE_DIR), which calls each plugin's enqueue as TensorRT does. In the same
process and run, for each case:

  BitLinear, 4096 x 4096, float16 x, tokens 1, 3, 16, 64: a CUDA graph of one call per weight copy, the copies together
  3x the L2 (every call reads its weights from DRAM), replayed; the time of a call is the median replay / copies. The
  plugin's enqueues are captured by the harness; the Triton kernel (bitlinear_w2a8, with PDL) is timed by
  benchmarks/bitlinear_kernels.time_graph over the same number of copies. Both outputs are compared bitwise with
  bitlinear_int first.
  BytePatchDecode, bGPT base's byte decoder (3 layers, n_embd 768, 12 heads, 16-byte patches; weights N(0, 0.3)),
  float32, greedy, batch 1, 3 and 64: one whole patch. The plugin: a CUDA graph of one enqueue, replayed. The Triton
  path: PatchDecoder's CUDA graph (the fused Triton decode kernels up to 4 rows; torch's path above), replayed and
  timed with CUDA events. Both patches are compared with bgpt.generate_patch (greedy) on the same feature.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bytedeploy.bench import machine_name
from bytedeploy.benchmarks.bitlinear_kernels import copies_for, time_eager, time_graph
from bytedeploy.models import bgpt
from bytedeploy.models.bitlinear import bitlinear_int, pack_ternary
from bytedeploy.plugins import build_trt
from bytedeploy.plugins.patch_decode import PatchDecoder, plugin_fields_of
from bytedeploy.plugins.trt_harness import Harness
from bytedeploy.sampling import SamplingConfig

BITLINEAR_SHAPE = (4096, 4096)  # (N, K)
BITLINEAR_TOKENS = (1, 3, 16, 64)
BYTE_DECODER = {"patch_size": 16, "n_embd": 768, "byte_n_layer": 3, "byte_n_head": 12}  # bGPT base
PATCH_BATCHES = (1, 3, 64)
GREEDY = SamplingConfig(temperature=0.0)


def bench_bitlinear(harness: Harness, folder: Path, replays: int, l2_bytes: int) -> list[dict]:
    from bytedeploy.plugins.bitlinear_kernels import GEMV_MAX_TOKENS, bitlinear_w2a8

    N, K = BITLINEAR_SHAPE
    gen = torch.Generator().manual_seed(0)
    packed = pack_ternary(torch.randint(-1, 2, (N, K), generator=gen, dtype=torch.int8))
    beta = torch.tensor([0.0213])
    fields = {"in_features": np.array([K], np.int32), "out_features": np.array([N], np.int32)}
    copies = copies_for(packed.numel(), l2_bytes)
    packed_gpu, beta_gpu = packed.cuda(), beta.cuda()
    packed_copies = [packed_gpu.clone() for _ in range(copies)]
    rows = []
    for M in BITLINEAR_TOKENS:
        x = torch.randn(M, K, generator=gen).half()
        inputs, outputs = [x.numpy(), packed.numpy(), beta.numpy()], [(np.float16, (M, N))]
        reference = bitlinear_int(x.cuda(), packed_gpu, beta_gpu, K).half()
        (y,), _ = harness.run("BitLinear", fields, inputs, outputs, folder / f"bitlinear{M}")
        plugin = harness.time("BitLinear", fields, inputs, outputs, folder / f"bitlinear{M}", copies, replays)
        x_gpu, out = x.cuda(), torch.empty(M, N, dtype=torch.float16, device="cuda")
        triton_exact = torch.equal(bitlinear_w2a8(x_gpu, packed_gpu, beta_gpu, K), reference)
        triton_us = time_graph([lambda w=w, x=x_gpu, y=out: bitlinear_w2a8(x, w, beta_gpu, K, out=y)
                                for w in packed_copies], replays)
        rows.append({"N": N, "K": K, "M": M, "plugin_path": "GEMV (dp4a)" if M <= 4 else "int8 MMA (mma.sync)",
                     "triton_path": "GEMV" if M <= GEMV_MAX_TOKENS else "GEMM",
                     "plugin_exact": bool(np.array_equal(y, reference.cpu().numpy())), "triton_exact": triton_exact,
                     "plugin_us": plugin["us_per_call"], "triton_us": round(triton_us, 3),
                     "speedup_vs_triton": round(triton_us / plugin["us_per_call"], 3),
                     "weight_copies": copies,
                     "plugin_weight_GBps": round(packed.numel() / plugin["us_per_call"] / 1e3, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_patch_decode(harness: Harness, folder: Path, replays: int) -> list[dict]:
    torch.manual_seed(0)
    model = bgpt.Model(bgpt.Config(n_layer=1, n_head=12, **BYTE_DECODER))  # a 1-layer patch decoder: not timed
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # peaked byte distributions: greedy choices without near-ties
    model = model.cuda().eval()
    fields = plugin_fields_of(model, GREEDY)
    P, C = model.cfg.patch_size, model.cfg.n_embd
    weight_bytes = 4 * fields["weights"].size  # the byte decoder's, read once per byte step
    rows = []
    for B in PATCH_BATCHES:
        feature = torch.randn(B, C, generator=torch.Generator().manual_seed(B))
        inputs = [feature.numpy(), np.zeros((B, P), np.int32), np.array([0], np.int32)]
        outputs = [(np.int32, (B, P))]
        with torch.no_grad():
            caches = model.byte_decoder.make_caches(B, P)
            reference = bgpt.generate_patch(model, feature.cuda(), torch.zeros(B, 0, dtype=torch.long, device="cuda"),
                                            caches, GREEDY, None).cpu().numpy()
            decoder = PatchDecoder(model, B, GREEDY)
            triton_patch = decoder(feature.cuda()).cpu().numpy()
        (patch,), _ = harness.run("BytePatchDecode", fields, inputs, outputs, folder / f"patch{B}")
        plugin = harness.time("BytePatchDecode", fields, inputs, outputs, folder / f"patch{B}", 1, replays)
        triton_us = time_eager(decoder.graph.replay, replays, warmup=3)
        rows.append({"batch": B, "dtype": "float32", **BYTE_DECODER,
                     "triton_path": "fused Triton kernels" if decoder.fused else "torch (cuBLAS)",
                     "plugin_equals_generate_patch": bool(np.array_equal(patch, reference)),
                     "triton_equals_generate_patch": bool(np.array_equal(triton_patch, reference)),
                     "plugin_us_per_patch": plugin["us_per_call"], "triton_us_per_patch": round(triton_us, 1),
                     "speedup_vs_triton": round(triton_us / plugin["us_per_call"], 3),
                     "plugin_weight_TBps": round(P * weight_bytes / plugin["us_per_call"] / 1e6, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--tensorrt-include", default=None, help="folder with TensorRT's NvInferRuntime.h")
    parser.add_argument("--plugins", default="BitLinear,BytePatchDecode", help="which plugins to time (comma list)")
    args = parser.parse_args(argv)
    plugins = args.plugins.split(",")
    if unknown := [p for p in plugins if p not in ("BitLinear", "BytePatchDecode")]:
        print(f"Error: unknown plugin {', '.join(unknown)}; --plugins takes BitLinear and BytePatchDecode",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("Error: the plugin benchmark needs a CUDA GPU", file=sys.stderr)
        return 1
    arch = "".join(map(str, torch.cuda.get_device_capability()))
    props = torch.cuda.get_device_properties(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        library = build_trt.build(folder / "lib", (arch,), args.tensorrt_include)
        harness = Harness.build(folder / "harness", library, args.tensorrt_include)
        result = {"benchmark": "trt_plugins", "machine": machine_name(), "gpu": torch.cuda.get_device_name(0),
                  "library_arch": f"sm_{arch}",
                  "command": "python -m bytedeploy.benchmarks.trt_plugins " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv),
                  "timing": f"CUDA graphs replayed; median of {args.replays} event-timed replays after 3 warm-ups "
                            "(BitLinear: per call of a graph over weight copies taking 3x the L2)"}
        if "BitLinear" in plugins:
            result["bitlinear"] = bench_bitlinear(harness, folder, args.replays, props.L2_cache_size)
        if "BytePatchDecode" in plugins:
            result["byte_patch_decode"] = bench_patch_decode(harness, folder, args.replays)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
