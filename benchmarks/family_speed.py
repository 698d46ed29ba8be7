"""Train a family for a few hundred steps, then time generation at batch 1 with each of its backends, in one run.

    python -m bytedeploy.benchmarks.family_speed --family bgpt --preset base --steps 300 \
        --out benchmarks/results/h100-train-bgpt-base.json

Training throughput is targets (bytes, chars, tokens) per second over the steps after the first 10 (warm-up and
CUDA initialisation excluded). Generation uses greedy decoding so every backend produces the same tokens, after one
untimed warm-up call per backend; the speed-up of each backend is its rate over eager-reference's, measured here.
Backends that count model passes report passes per generated token; sigma-GPT's burst backend also for one
sampled run (temperature 1, seed 0), as greedy proposals are accepted more often than sampled ones.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import torch

from bytedeploy.bench import machine_name, parse_value
from bytedeploy.cli import build_model_config
from bytedeploy.generation import GenerateRequest
from bytedeploy.registry import get_family
from bytedeploy.sampling import SamplingConfig
from bytedeploy.training import TrainConfig, train


def run(family: str, preset: str, steps: int, batch_size: int, lr: float, data: str, prompt: str, max_new: int,
        options: dict, device: str) -> dict:
    fam = get_family(family)
    dev = torch.device(device)
    data_options = {"eval_split": 0.05, **options}
    cfg = build_model_config(fam, preset, {})
    if hasattr(fam, "prepare_config"):
        cfg = fam.prepare_config(cfg, data, data_options)
    torch.manual_seed(0)
    model = fam.Model(cfg)
    train_data = fam.make_data(cfg, data, data_options)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(20, steps // 10), eval_every=0,
                       ckpt_every=0, eval_batches=8)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        history = train(model, train_data, tcfg, out, family=family, model_config=cfg, device=dev,
                        assets=getattr(train_data, "assets", None), progress=False)
        train_seconds = time.perf_counter() - t0
        model.eval()
        request_options = {"assets": f"{out}/assets", **options}
        rates = [r for s, r in history["targets_per_s"] if s > 10] or [r for _, r in history["targets_per_s"]]
        result = {
            "family": family, "preset": preset, "machine": machine_name(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train": {"steps": steps, "batch_size": batch_size,
                      "precision": "bf16 autocast" if dev.type == "cuda" else "fp32", "seconds": train_seconds,
                      f"{train_data.unit}s_per_s_median": statistics.median(rates),
                      "eval_loss_start": history["eval"][0][1], "eval_loss_end": history["eval"][-1][1]},
            "generate": {},
        }
        if getattr(fam, "LOSS_IS_NLL", True):
            result["train"][f"eval_bits_per_{train_data.unit}_start"] = history["eval"][0][1] / math.log(2)
            result["train"][f"eval_bits_per_{train_data.unit}_end"] = history["eval"][-1][1] / math.log(2)
        for backend in fam.BACKENDS:
            request = GenerateRequest(prompt.encode(), max_new, 1, SamplingConfig(temperature=0.0),
                                      dict(request_options))
            fam.generate(model, cfg, request, backend)  # warm-up
            res = fam.generate(model, cfg, request, backend)
            result["generate"][backend] = {"batch_size": 1, "new": res.n_new, "unit": res.unit,
                                           "seconds": res.seconds, "per_s": res.per_second,
                                           "passes": res.passes, "output_head": res.outputs[0][:80].decode(
                                               "utf-8", errors="replace")}
            if backend == "burst":  # greedy proposals agree more often than sampled ones: count a sampled run too
                sampled = GenerateRequest(prompt.encode(), max_new, 1, SamplingConfig(temperature=1.0, seed=0),
                                          dict(request_options))
                res = fam.generate(model, cfg, sampled, backend)
                result["generate"][backend]["passes_per_token_sampled"] = res.passes / max(res.n_new, 1)
        ref = result["generate"].get("eager-reference")
        for row in result["generate"].values():
            if ref and ref["per_s"]:
                row["speedup_vs_eager_reference"] = row["per_s"] / ref["per_s"]
            if row["passes"]:
                row["passes_per_token"] = row["passes"] / max(row["new"], 1)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", default="builtin:stdlib")
    p.add_argument("--prompt", default="import os\n")
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="data/generation option, e.g. ext=py or first_mb=2 (numbers are parsed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the JSON here (also printed)")
    a = p.parse_args()
    options = {}
    for kv in a.option:
        k, v = kv.split("=", 1)
        options[k] = parse_value(v)
    result = run(a.family, a.preset, a.steps, a.batch_size, a.lr, a.data, a.prompt, a.max_new, options, a.device)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
