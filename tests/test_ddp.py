"""DistributedDataParallel across numbers of processes: two gloo processes on the CPU against one, for tiny bGPT and
tiny BitNet. The same global batch gives the same loss curve, and a checkpoint saved by rank 0 resumes on another
number of processes (2 -> 1 and 1 -> 2) with its step, optimizer state and data position, continuing as the
uninterrupted run does.

"Within noise", numerically. All runs train on the same rows at every step (each step's rows are drawn whole from
(seed, step) and every rank trains on its slices; the draws are compared hash for hash), dropout is 0 and bGPT
trains its byte decoder on every patch (no random patch sampling), so nothing random differs between them. What is
left is the order of floating-point sums: two processes of 2 rows per micro-batch reduce other partial sums than
one process of 4 rows, and AdamW carries the difference on. TOLERANCES bound it:
- bGPT: losses within 1e-5 relative (measured: up to 1.3e-7), AdamW moments and weights within 1e-3 in relative
  norm (measured: 1.2e-4; Adam turns a gradient entry that nearly cancels, and so may change sign, into a whole step);
- BitNet: 2e-4 and 5e-2 (measured: 1.8e-5 and 5.4e-3; 5.3e-5 for the losses of a run with 8 steps of 16 rows): its
  forward pass rounds weights to ternary and activations to 8-bit levels, so a sum that lands on the other side of
  a rounding boundary moves a value by a whole level.
The data's own noise is far larger: the same run on other rows (seed 1) moves the losses by a median of more than
10 x the loss tolerance and the states by more than 10 x theirs, which the tests check, so the tolerances cannot hide
a run that trained on other rows or weighted them wrongly. Where the sums are the same (one process's micro-batches
of 4 rows become one micro-batch of 4 rows on each of two processes: gloo adds the two gradients as accumulation
did) the run continues bit for bit, and the 1 -> 2 test asserts exactly that.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bytedeploy import training
from bytedeploy.benchmarks import ddp_scaling
from bytedeploy.checkpoint import load_model, read_checkpoint, read_train_state
from bytedeploy.config import config_from_dict
from bytedeploy.errors import UserError
from bytedeploy.registry import get_family
from bytedeploy.training import DistInfo, TrainConfig, split_for_world, train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]

FAMILIES = {"bgpt": {"patch_sampling_batch_size": 0, "dropout": 0.0}, "bitnet": {"dropout": 0.0}}
STEPS, CKPT_EVERY, GRAD_ACCUM = 6, 3, 2
ROWS = 8  # rows per step: 2 micro-batches of 4 rows on 1 process, of 2 rows per process on 2
CRASH_AT = CKPT_EVERY + 1  # the first draw after the periodic checkpoint (every rank draws each step's rows once)
TOLERANCES = {"bgpt": (1e-5, 1e-3), "bitnet": (2e-4, 5e-2)}  # relative: (losses, optimizer state and weights)
SPAWN_TIMEOUT_S = 180
WORDS = ("def", "return", "self", "value", "import", "for", "in", "range", "if", "else", "print", "x", "y", "=",
         "+", "(", ")", ":", "None", "True", "list", "data")


class Preempted(Exception):
    """The machine went away: the run stops, and its last periodic checkpoint is what is left."""


class RecordedData:
    """A family's training data that appends a hash of every batch it draws to a file (one per rank), and raises
    Preempted at its crash_at-th draw."""

    def __init__(self, data, path: str, crash_at: int | None):
        self.data, self.path, self.crash_at, self.draws = data, path, crash_at, 0
        self.unit = data.unit

    def train_batch(self, rng, batch_size):
        self.draws += 1
        if self.draws == self.crash_at:
            raise Preempted
        batch = self.data.train_batch(rng, batch_size)
        digest = hashlib.sha256(b"".join(batch[k].numpy().tobytes() for k in sorted(batch))).hexdigest()
        with open(self.path, "a") as f:
            f.write(digest + "\n")
        return batch

    def eval_batches(self, batch_size, max_batches):
        return self.data.eval_batches(batch_size, max_batches)


def run_job(root: str, family: str, name: str, dist_info: DistInfo, *, seed: int = 0, crash_at: int | None = None,
            resume: bool = False, log=print) -> None:
    """Train `name` (a checkpoint folder under root) for STEPS steps, or resume it; Preempted ends it quietly."""
    fam, out = get_family(family), os.path.join(root, family, name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if resume:
        model, cfg, ckpt = load_model(out)
        tcfg = config_from_dict(TrainConfig, ckpt.meta["train_config"], what="train config")
        state = read_train_state(out)
    else:
        cfg = fam.Config(**dict(fam.PRESETS["tiny"], **FAMILIES[family]))
        torch.manual_seed(0)
        model, state = fam.Model(cfg), None
        tcfg = TrainConfig(steps=STEPS, batch_size=ROWS // GRAD_ACCUM // dist_info.world_size, grad_accum=GRAD_ACCUM,
                           lr=3e-3, warmup=2, eval_every=0, eval_batches=2, eval_batch_size=4, ckpt_every=CKPT_EVERY,
                           seed=seed)
    phase = "resumed" if resume else "first"
    data = RecordedData(fam.make_data(cfg, os.path.join(root, "data"), {"eval_split": 0.25}),
                        f"{out}.{phase}.rank{dist_info.rank}", crash_at)
    try:
        train(model, data, tcfg, out, family=family, model_config=cfg, device=torch.device("cpu"),
              resume_state=state, dist_info=dist_info, progress=False, log=log)
    except Preempted:
        pass


def rank_worker(rank: int, world: int, port: int, root: str, jobs: list[dict]) -> None:
    """One process of a gloo group on 127.0.0.1, set up as torchrun would, running the jobs in turn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist_info = training.init_distributed()
    for job in jobs:
        run_job(root, dist_info=dist_info, log=lambda line: None, **job)
    training.destroy_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, root: str, jobs: list[dict]) -> None:
    context = mp.spawn(rank_worker, args=(world, free_port(), root, jobs), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish in {SPAWN_TIMEOUT_S} s (a hang in a collective?)")


def write_files(folder) -> None:
    """40 small Python-like files (up to 20 patches of tiny bGPT)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(rng.integers(2, 10))]
        (folder / f"mod_{i}.py").write_text("\n".join(lines)[:300] + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of the tests below, per family (2 processes are started once, for all of them):
    one / two: STEPS uninterrupted steps on 1 / 2 processes; one-seed1: one on other batches;
    two-to-one: preempted after its periodic checkpoint on 2 processes, resumed on 1; one-to-two: the other way."""
    root = tmp_path_factory.mktemp("ddp")
    write_files(root / "data")
    logs = []
    single = DistInfo()
    for family in FAMILIES:
        run_job(str(root), family, "one", single)
        run_job(str(root), family, "one-seed1", single, seed=1)
        run_job(str(root), family, "one-to-two", single, crash_at=CRASH_AT)
    jobs = []
    for family in FAMILIES:
        jobs += [dict(family=family, name="two"), dict(family=family, name="two-to-one", crash_at=CRASH_AT),
                 dict(family=family, name="one-to-two", resume=True)]
    spawn_ranks(2, str(root), jobs)
    for family in FAMILIES:
        run_job(str(root), family, "two-to-one", single, resume=True, log=logs.append)
    return root, logs


def history(root, family, name) -> dict:
    return read_checkpoint(root / family / name).meta["history"]


def losses(root, family, name) -> list[float]:
    h = history(root, family, name)
    assert [s for s, _ in h["loss"]] == list(range(1, STEPS + 1))
    return [loss for _, loss in h["loss"]]


def draws(root, family, name, phase="first", rank=0) -> list[str]:
    return (root / family / f"{name}.{phase}.rank{rank}").read_text().split()


def loss_diffs(root, family, name) -> list[float]:
    """Relative difference of each step's loss from the uninterrupted one-process run's."""
    return [abs(a - b) / abs(b) for a, b in zip(losses(root, family, name), losses(root, family, "one"), strict=True)]


def state_diff(root, family, name) -> float:
    """The largest relative difference (in norm) of an AdamW moment or a weight from the one-process run's."""
    (model, *_), (ref_model, *_) = load_model(root / family / name), load_model(root / family / "one")
    state, ref_state = read_train_state(root / family / name), read_train_state(root / family / "one")
    pairs = [(model.state_dict()[k], v) for k, v in ref_model.state_dict().items()]
    for moments, ref_moments in zip(state["optimizer"]["state"].values(), ref_state["optimizer"]["state"].values(),
                                    strict=True):
        assert float(moments["step"]) == float(ref_moments["step"]) == STEPS
        pairs += [(moments[k], ref_moments[k]) for k in ("exp_avg", "exp_avg_sq")]
    return max(float((a - b).norm() / b.norm()) for a, b in pairs)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_follow_the_one_process_loss_curve(runs, family):
    root, _ = runs
    loss_tol, state_tol = TOLERANCES[family]
    one = draws(root, family, "one")
    assert len(one) == STEPS and len(set(one)) == STEPS
    assert draws(root, family, "two", rank=0) == draws(root, family, "two", rank=1) == one  # the same rows
    assert history(root, family, "two")["lr"] == history(root, family, "one")["lr"]
    assert max(loss_diffs(root, family, "two")) < loss_tol
    evals = [[history(root, family, name)["eval"][i][1] for i in (0, -1)] for name in ("two", "one")]
    assert evals[0] == pytest.approx(evals[1], rel=loss_tol)
    assert state_diff(root, family, "two") < state_tol
    assert read_checkpoint(root / family / "two").meta["world_size"] == 2
    # the tolerances are far below the noise of the data
    assert statistics.median(loss_diffs(root, family, "one-seed1")) > 10 * loss_tol
    assert state_diff(root, family, "one-seed1") > 10 * state_tol


def assert_resumed_like_uninterrupted(root, family, name, saved_world, resumed_world):
    """`name` ran CKPT_EVERY steps on saved_world processes, was preempted, and ran the rest on resumed_world: its
    step, data, schedule, losses, optimizer state and weights continue as the uninterrupted runs'."""
    loss_tol, state_tol = TOLERANCES[family]
    ckpt = read_checkpoint(root / family / name)
    assert ckpt.meta["step"] == STEPS and ckpt.meta["world_size"] == resumed_world
    train_config = ckpt.meta["train_config"]
    assert train_config["batch_size"] * train_config["grad_accum"] * resumed_world == ROWS  # the global batch kept
    saved_like = "one" if saved_world == 1 else "two"  # the same steps on the same number of processes: bit for bit
    assert losses(root, family, name)[:CKPT_EVERY] == losses(root, family, saved_like)[:CKPT_EVERY]
    assert draws(root, family, name) + draws(root, family, name, "resumed") == draws(root, family, "one")
    if resumed_world == 2:
        assert draws(root, family, name, "resumed", rank=1) == draws(root, family, name, "resumed")
    assert history(root, family, name)["lr"] == history(root, family, "one")["lr"]
    assert max(loss_diffs(root, family, name)) < loss_tol
    assert state_diff(root, family, name) < state_tol
    state = read_train_state(root / family / name)
    assert state["step"] == STEPS and state["world_size"] == resumed_world and len(state["rng"]) == resumed_world


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_of_two_processes_resumes_on_one(runs, family):
    root, logs = runs
    assert_resumed_like_uninterrupted(root, family, "two-to-one", saved_world=2, resumed_world=1)
    assert f"resuming a run of 2 ranks on 1: its steps of {ROWS} rows as 4 micro-batches of 2 rows per rank" in logs


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_of_one_process_resumes_on_two(runs, family):
    root, _ = runs
    assert_resumed_like_uninterrupted(root, family, "one-to-two", saved_world=1, resumed_world=2)
    train_config = read_checkpoint(root / family / "one-to-two").meta["train_config"]
    assert (train_config["batch_size"], train_config["grad_accum"]) == (ROWS // GRAD_ACCUM, 1)
    assert losses(root, family, "one-to-two") == losses(root, family, "one")  # the same sums: bit for bit
    assert state_diff(root, family, "one-to-two") == 0
    rngs = read_train_state(root / family / "one-to-two")["rng"]
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # the new rank drew its own random numbers


def test_a_resume_on_another_number_of_ranks_keeps_the_rows_per_step_and_the_memory_per_rank():
    def split(batch_size, grad_accum, saved_world, world):
        cfg = split_for_world(TrainConfig(batch_size=batch_size, grad_accum=grad_accum), saved_world, world)
        return cfg.batch_size, cfg.grad_accum

    assert split(8, 1, 8, 1) == (8, 8)  # an 8-GPU run on one GPU: 8 micro-batches of the rows one GPU held
    assert split(2, 4, 1, 2) == (2, 2)
    assert split(8, 1, 1, 2) == (4, 1)
    assert split(4, 3, 1, 2) == (3, 2)  # 6 rows per rank: the largest micro-batch of at most 4 that divides them
    assert split(4, 2, 2, 2) == (4, 2)
    with pytest.raises(UserError, match="steps of 8 rows .* do not split evenly over 3 ranks"):
        split(4, 1, 2, 3)


def test_the_scaling_benchmark_on_one_and_two_cpu_processes(tmp_path):
    """benchmarks/ddp_scaling.py's CPU path: torchrun with 1 and 2 gloo processes, the same global batch."""
    write_files(tmp_path / "data")
    out = tmp_path / "cpu-ddp.json"
    result = ddp_scaling.main([
        "--family", "bgpt", "--preset", "tiny", "--gpus", "2,1", "--device", "cpu", "--steps", "3", "--skip", "1",
        "--batch-size", "2", "--eval-batches", "2", "--data", str(tmp_path / "data"),
        "--set", "patch_sampling_batch_size=0", "--set", "dropout=0", "--timeout", "240", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert (result["backend"], result["dtype"], result["global_batch"]) == ("gloo", "float32", 4)
    assert result["environment"]["NCCL_NVLS_ENABLE"] == "0"
    one, two = result["runs"]
    assert [(r["gpus"], r["batch_size"], r["grad_accum"], r["global_batch"]) for r in (one, two)] == [
        (1, 2, 2, 4), (2, 2, 1, 4)]  # as the runs saved it: the same global batch
    for run in (one, two):
        assert [step for step, _ in run["loss"]] == [1, 2, 3] and [step for step, _ in run["eval"]] == [0, 3]
        assert run["bytes_per_s"] > 0 and run["bytes_per_s_per_gpu"] == pytest.approx(run["bytes_per_s"] / run["gpus"])
    assert two["speedup"] == pytest.approx(two["bytes_per_s"] / one["bytes_per_s"])
    assert (one["efficiency"], two["efficiency"]) == (1.0, pytest.approx(two["speedup"] / 2))
    assert two["loss_rel_diff_max"] < TOLERANCES["bgpt"][0]  # the same rows at every step
    assert two["eval_end_rel_diff"] < TOLERANCES["bgpt"][0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("family", FAMILIES)
def test_the_scaling_benchmark_on_one_and_two_gpus(tmp_path, family):
    """The NCCL path: float32, so that the curves compare closely (CUDA's atomic sums are unordered: 1e-3)."""
    write_files(tmp_path / "data")
    sets = [arg for key, value in FAMILIES[family].items() for arg in ("--set", f"{key}={value}")]
    result = ddp_scaling.main([
        "--family", family, "--preset", "tiny", "--gpus", "1,2", "--device", "cuda", "--dtype", "float32",
        "--steps", "6", "--skip", "2", "--batch-size", "4", "--eval-batches", "2", "--data", str(tmp_path / "data"),
        *sets, "--timeout", "300"])
    assert result["backend"] == "nccl"
    one, two = result["runs"]
    assert [(r["gpus"], r["grad_accum"], r["global_batch"]) for r in (one, two)] == [(1, 2, 8), (2, 1, 8)]
    assert two["bytes_per_s_per_gpu"] > 0 and two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert two["loss_rel_diff_max"] < 1e-3 and two["eval_end_rel_diff"] < 1e-3
