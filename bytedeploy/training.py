"""The training loop every family shares.

AdamW, linear warmup then cosine decay, gradient accumulation, gradient clipping, bf16 autocast on CUDA,
periodic eval (mean loss per target; bits per target for likelihood models), checkpoints every N steps and on
interruption, exact resume, and DistributedDataParallel when started by torchrun.

Exact resume: the batch of step s is drawn from an RNG seeded by (seed, s, micro-step, rank), and the torch RNG
state is checkpointed as it was at the start of the next step, so a resumed run replays the same steps.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.config import config_to_dict


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100  # 0 = only before and after
    eval_batches: int = 8
    eval_batch_size: int = 8
    ckpt_every: int = 100  # 0 = only at the end
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * ratio


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only (not on norms, biases or 1-d gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def autocast_for(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def resolve_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            from bytedeploy.errors import UserError

            raise UserError("device 'cuda' asked for, but this machine has no CUDA GPU visible to PyTorch")
        if dist_info and dist_info.world_size > 1:
            return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, cfg: TrainConfig, device: torch.device) -> float:
    """Mean loss per target over the fixed eval batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in data.eval_batches(cfg.eval_batch_size, cfg.eval_batches):
        with autocast_for(device, cfg.precision):
            loss, n = model({k: v.to(device) for k, v in batch.items()})
        total += float(loss) * n
        count += n
    model.train(was_training)
    if dist.is_initialized():
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(model: torch.nn.Module, data, cfg: TrainConfig, out_dir: str | Path, *, family: str, model_config,
          device: torch.device, meta: dict | None = None, assets: dict | None = None,
          resume_state: dict | None = None, dist_info: DistInfo | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> dict:
    """Train for cfg.steps optimizer steps (continuing from resume_state), checkpointing to out_dir.

    Returns the history: {"loss": [[step, loss], ...], "eval": [[step, eval_loss], ...], ...}."""
    dist_info = dist_info or DistInfo()
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    history = {"loss": [], "eval": [], "targets_per_s": []}
    step = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        history = resume_state["history"]
        step = resume_state["step"]
        set_rng_state(resume_state["rng"], device)
    else:
        torch.manual_seed(cfg.seed)
    train_model = model
    if dist_info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    unit = getattr(data, "unit", "token")

    def checkpoint(at_step: int, rng: dict) -> None:
        if not dist_info.is_main:
            return
        state = {"optimizer": optimizer.state_dict(), "step": at_step, "rng": rng, "history": history}
        run_meta = dict(meta or {}, step=at_step, train_config=config_to_dict(cfg), history=history)
        save_checkpoint(out_dir, model, family, model_config, run_meta, train_state=state, assets=assets)

    if step == 0 and not history["eval"]:
        history["eval"].append([0, evaluate(model, data, cfg, device)])
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and dist_info.is_main), unit="step",
               dynamic_ncols=True)
    step_rng = rng_state(device)
    try:
        while step < cfg.steps:
            step_rng = rng_state(device)
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, n_targets = 0.0, 0
            for micro in range(cfg.grad_accum):
                rng = np.random.default_rng([cfg.seed, step, micro, dist_info.rank])
                batch = {k: v.to(device, non_blocking=True) for k, v in data.train_batch(rng, cfg.batch_size).items()}
                sync_grads = micro == cfg.grad_accum - 1
                ctx = train_model.no_sync() if (dist_info.world_size > 1 and not sync_grads) else nullcontext()
                with ctx, autocast_for(device, cfg.precision):
                    loss, n = train_model(batch)
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
                n_targets += n
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = n_targets * dist_info.world_size / (time.perf_counter() - t0)
            mean_loss = loss_sum / cfg.grad_accum
            history["loss"].append([step, mean_loss])
            history["targets_per_s"].append([step, rate])
            bar.set_postfix(loss=f"{mean_loss:.3f}", **{f"{unit}s/s": f"{rate:,.0f}"})
            bar.update(1)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss} at step {step}; last good checkpoint kept")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                history["eval"].append([step, evaluate(model, data, cfg, device)])
                bar.write(f"step {step}: eval loss {history['eval'][-1][1]:.4f}")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                checkpoint(step, rng_state(device))
    except KeyboardInterrupt:
        bar.close()
        # the interrupted step changed no weights; resume replays it from its own RNG state
        checkpoint(step, step_rng)
        log(f"interrupted: checkpoint of step {step} saved to {out_dir}; continue with --resume")
        raise
    bar.close()
    history["eval"].append([step, evaluate(model, data, cfg, device)])
    checkpoint(step, rng_state(device))
    return history
