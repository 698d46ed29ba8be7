"""The training loop every family shares.

AdamW, linear warmup then cosine decay, gradient accumulation, gradient clipping, bf16 autocast on CUDA,
periodic eval (mean loss per target; bits per target for likelihood models), checkpoints every N steps and on
interruption, exact resume, and DistributedDataParallel when started by torchrun.

One optimizer step minimises the mean loss per target over all its micro-batches on all ranks: each micro-batch's
mean loss is weighted by its number of targets, so grad_accum=2 x batch 4 gives the gradient of batch 8 even when
the micro-batches hold different numbers of targets (plain loss / grad_accum would not).

Exact resume: the rows of step s (batch_size x grad_accum x ranks) are drawn from a numpy RNG seeded by (seed, s);
every rank draws them all and trains on its own slice of each micro-batch, so a step trains on the same rows on any
number of ranks and any split into micro-batches. The torch RNG (dropout, patch sampling, diffusion times) of every
rank is checkpointed as it stands after the last completed step; eval seeds a saved-and-restored torch RNG per
batch, so it never moves the training RNG and gives the same number on any number of ranks. Ctrl-C saves a
checkpoint of the last completed step (it is held back while an update is applied, so weights, step and RNG always
agree), and a resumed run replays the remaining steps bit for bit. A run resumed on another number of ranks keeps
its rows per step (split_for_world shares them out again) and so its data and optimizer state; it then matches the
uninterrupted run up to the order of floating-point sums, provided the model draws no random numbers in training
(dropout 0, no patch sampling: each rank's random numbers are its own).
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from bytedeploy.checkpoint import check_replaceable, save_checkpoint
from bytedeploy.config import config_to_dict
from bytedeploy.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the gradient became inf or nan; the last good checkpoint is left as it was."""


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
    grad_clip: float = 1.0  # 0 = off
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
        for name in ("warmup", "weight_decay", "grad_clip", "eval_every", "ckpt_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of the update that step `step` (0-based) applies: linear warmup to cfg.lr over cfg.warmup
    steps, then cosine decay that reaches cfg.lr * cfg.min_lr_ratio at step cfg.steps."""
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
        # a process group still alive at interpreter exit can abort the process ("terminate called without an
        # active exception" from gloo's threads), turning a finished run into a failed one
        atexit.register(destroy_distributed)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("device 'cuda' asked for, but this machine has no CUDA GPU visible to PyTorch")
        if dist_info and dist_info.world_size > 1:
            return torch.device("cuda", dist_info.local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None


def seed_for(*keys: int) -> int:
    """A torch seed derived from several integers (run seed, rank, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, cfg: TrainConfig, device: torch.device) -> float:
    """Mean loss per target over the fixed eval batches, shared out between ranks under torchrun.

    Batch i runs with the torch RNG seeded by i (families whose loss samples noise or orders get the same eval
    every time, on any number of ranks); the caller's RNG state is restored afterwards."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    saved_rng = rng_state(device)
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(data.eval_batches(cfg.eval_batch_size, cfg.eval_batches)):
            if i % world != rank:
                continue
            torch.manual_seed(i)
            with autocast_for(device, cfg.precision):
                loss, n = model({k: v.to(device) for k, v in batch.items()})
            total += float(loss) * n
            count += n
    finally:
        set_rng_state(saved_rng, device)
        model.train(was_training)
    if world > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


@contextmanager
def interrupts_held():
    """Hold Ctrl-C back until the block ends, so that the weights, the step count and the RNG snapshot change
    together (an interrupt inside AdamW's update would leave some tensors updated and others not)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


def draw_step_batch(data, cfg: TrainConfig, step: int, world_size: int) -> dict[str, torch.Tensor]:
    """All the rows of step `step`, over every micro-step and rank: batch_size x grad_accum x world_size rows from a
    numpy RNG seeded by (seed, step) alone. Every rank draws all of them and trains on its own slices (micro_batch):
    drawing only a rank's rows would tie the data to the number of ranks and the split into micro-batches, and a run
    could neither be compared with nor resumed on another number of GPUs."""
    rng = np.random.default_rng([cfg.seed, step])
    return data.train_batch(rng, cfg.batch_size * cfg.grad_accum * world_size)


def micro_batch(step_batch: dict[str, torch.Tensor], micro: int, cfg: TrainConfig,
                dist_info: DistInfo) -> dict[str, torch.Tensor]:
    """This rank's batch_size rows of micro-step `micro`."""
    start = (micro * dist_info.world_size + dist_info.rank) * cfg.batch_size
    return {k: v[start:start + cfg.batch_size] for k, v in step_batch.items()}


def split_for_world(cfg: TrainConfig, saved_world: int, world: int) -> TrainConfig:
    """The training config of a run saved on saved_world ranks and resumed on world: the same rows per step
    (batch_size x grad_accum x ranks), at most batch_size of them per rank and micro-step (the memory the run had),
    in as few micro-steps as that allows."""
    if saved_world == world:
        return cfg
    rows = cfg.batch_size * cfg.grad_accum * saved_world
    if rows % world:
        raise UserError(f"the run's steps of {rows} rows ({cfg.batch_size} x {cfg.grad_accum} micro-batches on "
                        f"{saved_world} ranks) do not split evenly over {world} ranks; resume it on a number of ranks "
                        f"that divides {rows}")
    per_rank = rows // world
    batch_size = max(b for b in range(1, min(cfg.batch_size, per_rank) + 1) if per_rank % b == 0)
    return replace(cfg, batch_size=batch_size, grad_accum=per_rank // batch_size)


def forward_backward(train_model: torch.nn.Module, data, cfg: TrainConfig, step: int, device: torch.device,
                     dist_info: DistInfo) -> tuple[float, int]:
    """Run the micro-batches of one step and backpropagate sum(mean loss x targets) over them.

    Leaves the gradient of the summed loss (averaged over ranks by DDP) in .grad; the caller divides by the
    number of targets. -> (summed loss, targets) on this rank."""
    loss_sum, n_targets = 0.0, 0
    step_batch = draw_step_batch(data, cfg, step, dist_info.world_size)
    for micro in range(cfg.grad_accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in micro_batch(step_batch, micro, cfg, dist_info).items()}
        last = micro == cfg.grad_accum - 1
        with train_model.no_sync() if (dist_info.world_size > 1 and not last) else nullcontext():
            with autocast_for(device, cfg.precision):
                loss, n = train_model(batch)
            (loss.float() * n).backward()
        loss_sum += float(loss.detach()) * n
        n_targets += n
    return loss_sum, n_targets


def train(model: torch.nn.Module, data, cfg: TrainConfig, out_dir: str | Path, *, family: str, model_config,
          device: torch.device, meta: dict | None = None, assets: dict | None = None,
          resume_state: dict | None = None, dist_info: DistInfo | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> dict:
    """Train for cfg.steps optimizer steps (continuing from resume_state), checkpointing to out_dir.

    Returns the history: {"loss": [[step, loss], ...], "eval": [[step, eval_loss], ...], "lr": ..., ...}.
    Raises TrainingDiverged (a UserError) when the loss or gradient stops being finite."""
    dist_info = dist_info or DistInfo()
    if dist_info.is_main:
        check_replaceable(out_dir)  # fail now, not at the first save
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    history: dict[str, list] = {"loss": [], "eval": [], "lr": [], "targets_per_s": []}
    step = 0
    if resume_state is not None:
        saved_world = int(resume_state.get("world_size", dist_info.world_size))
        cfg = split_for_world(cfg, saved_world, dist_info.world_size)
        if saved_world != dist_info.world_size and dist_info.is_main:
            log(f"resuming a run of {saved_world} ranks on {dist_info.world_size}: its steps of "
                f"{cfg.batch_size * cfg.grad_accum * dist_info.world_size} rows as {cfg.grad_accum} micro-batches "
                f"of {cfg.batch_size} rows per rank")
        step = int(resume_state["step"])
        if step >= cfg.steps:
            raise UserError(f"the run in {out_dir} already reached step {step} of {cfg.steps}; "
                            f"ask for more --steps to continue it")
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
        except (ValueError, KeyError, IndexError) as e:
            reason = str(e).splitlines()[0]
            raise UserError(f"the training state in {out_dir} does not fit this model: {reason}") from None
        history.update({k: list(v) for k, v in resume_state["history"].items()})
        rngs = resume_state["rng"]
        if dist_info.rank < len(rngs):
            set_rng_state(rngs[dist_info.rank], device)
        else:  # a rank the run did not have, or an interrupt under torchrun (it saves rank 0's RNG only)
            torch.manual_seed(seed_for(cfg.seed, dist_info.rank, step))
    else:
        torch.manual_seed(seed_for(cfg.seed, dist_info.rank, 0))  # ranks draw different dropout masks
    train_model = model
    if dist_info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    unit = getattr(data, "unit", "token")
    params = [p for p in model.parameters() if p.requires_grad]
    saved_step = step if resume_state is not None else None

    def checkpoint(at_step: int, rng: dict, all_ranks: bool = True) -> None:
        """Save on rank 0. all_ranks: every rank calls this at the same point, so gather each rank's RNG."""
        nonlocal saved_step
        rngs = [rng]
        if dist_info.world_size > 1 and all_ranks:
            rngs = [None] * dist_info.world_size
            dist.all_gather_object(rngs, rng)
        if dist_info.is_main:
            state = {"optimizer": optimizer.state_dict(), "step": at_step, "rng": rngs, "history": history,
                     "world_size": dist_info.world_size}
            run_meta = dict(meta or {}, step=at_step, train_config=config_to_dict(cfg), history=history,
                            world_size=dist_info.world_size)
            save_checkpoint(out_dir, model, family, model_config, run_meta, train_state=state, assets=assets)
        saved_step = at_step

    if step == 0 and not history["eval"]:
        history["eval"].append([0, evaluate(model, data, cfg, device)])
    done_rng = rng_state(device)  # the torch RNG as it stands after the last completed step
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and dist_info.is_main), unit="step",
               dynamic_ncols=True)
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            loss_sum, n_targets = forward_backward(train_model, data, cfg, step, device, dist_info)
            if dist_info.world_size > 1:
                t = torch.tensor([loss_sum, n_targets], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                loss_sum, n_targets = t[0].item(), int(t[1].item())
            mean_loss = loss_sum / max(n_targets, 1)
            for p in params:  # DDP averaged the ranks' summed gradients: make it the mean over all targets
                if p.grad is not None:
                    p.grad.mul_(dist_info.world_size / max(n_targets, 1))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf))
            if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
                kept = (f"the checkpoint of step {saved_step} in {out_dir} is kept" if saved_step is not None
                        else "no checkpoint was saved yet")
                raise TrainingDiverged(f"training diverged at step {step + 1}: loss {mean_loss}, gradient norm "
                                       f"{grad_norm}; {kept} (a lower --lr or --grad-clip may help)")
            lr = lr_at(step, cfg)
            with interrupts_held():
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                done_rng = rng_state(device)
                history["loss"].append([step, mean_loss])
                history["lr"].append([step, lr])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = n_targets / (time.perf_counter() - t0)  # all ranks' targets
            history["targets_per_s"].append([step, rate])
            bar.set_postfix(loss=f"{mean_loss:.3f}", **{f"{unit}s/s": f"{rate:,.0f}"})
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                history["eval"].append([step, evaluate(model, data, cfg, device)])
                bar.write(f"step {step}: eval loss {history['eval'][-1][1]:.4f}")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                checkpoint(step, done_rng)
        history["eval"].append([step, evaluate(model, data, cfg, device)])
        checkpoint(step, done_rng)
    except KeyboardInterrupt:
        bar.close()
        # other ranks may be gone: no collective here, the checkpoint holds rank 0's RNG only
        checkpoint(step, done_rng, all_ranks=False)
        log(f"interrupted: checkpoint of step {step} saved to {out_dir}; continue with --resume")
        raise
    finally:
        bar.close()
    if dist_info.world_size > 1:
        dist.barrier()  # every rank returns once rank 0's final checkpoint is on disk
    return history
