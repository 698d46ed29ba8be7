"""The shared training loop on tiny bGPT: it learns, resumes bit for bit, accumulates gradients exactly, stops
cleanly on divergence, and runs under DistributedDataParallel (two CPU ranks, gloo)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from bytedeploy import training
from bytedeploy.checkpoint import load_model, read_checkpoint
from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.models import bgpt
from bytedeploy.training import TrainConfig, TrainingDiverged, evaluate, forward_backward, lr_at, train

WORDS = ("def", "return", "self", "value", "import", "for", "in", "range", "if", "else", "print", "x", "y", "=",
         "+", "(", ")", ":", "None", "True", "list", "data")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """40 small Python-like files (fast to load, all within tiny bGPT's 992 bytes)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(40):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(rng.integers(4, 24))]
        (root / f"mod_{i}.py").write_text("\n".join(lines)[:900] + "\n")
    return root


def run_cli(args: list[str]):
    return CliRunner().invoke(cli, args)


def meta_of(path) -> dict:
    return json.loads((path / "config.json").read_text())["meta"]


def weights_of(path) -> dict[str, torch.Tensor]:
    return load_model(path)[0].state_dict()


# ------------------------------------------------------------------------------------------------ learning


def test_cli_training_lowers_eval_bits_per_byte_then_eval_and_generate_agree(tmp_path):
    out = tmp_path / "run"
    result = run_cli(["train", "bgpt", "--preset", "tiny", "--steps", "40", "--warmup", "10", "--batch-size", "16",
                      "--lr", "2e-3", "--eval-every", "0", "--eval-batches", "4", "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    meta = meta_of(out)
    (step0, first), (step_n, last) = meta["history"]["eval"]
    assert (step0, step_n, meta["step"], len(meta["history"]["loss"])) == (0, 40, 40, 40)
    assert first / math.log(2) > 7.5  # about uniform over 257 symbols at the start
    assert last < 0.6 * first, meta["history"]["eval"]

    result = run_cli(["eval", str(out), "--batches", "4", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert float(re.search(r"eval loss ([0-9.]+)", result.output).group(1)) == pytest.approx(last, abs=1e-4)

    result = run_cli(["generate", str(out), "--prompt", "import ", "--ext", "py", "--max-new", "48", "--seed", "0"])
    assert result.exit_code == 0, result.output
    n_new = int(re.search(r"eager: (\d+) bytes in", result.stderr).group(1))
    assert 0 < n_new <= 48 and result.stdout.strip()


# ------------------------------------------------------------------------------------------------ schedule


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps + 1)]
    assert lrs[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway down the cosine
    assert lrs[110] == pytest.approx(1e-4)
    assert lr_at(10_000, cfg) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    result = run_cli(["train", "bgpt", "--steps", "5", "--warmup", "-1", "--no-save"])
    assert result.exit_code == 1 and result.output.startswith("Error: bad training option: warmup must be >= 0")


class NoisyLoss(torch.nn.Module):
    """A loss that samples noise, like BFN's diffusion time: eval must still be repeatable."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        return torch.rand(()) + self.w + batch["x"].float().mean(), batch["x"].numel()


class CountingBatches:
    def eval_batches(self, batch_size, max_batches):
        for i in range(max_batches):
            yield {"x": torch.full((batch_size,), i)}


def test_eval_is_repeatable_and_leaves_the_training_rng_alone():
    model, data, cfg = NoisyLoss(), CountingBatches(), TrainConfig(eval_batches=3, eval_batch_size=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluate(model, data, cfg, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)
    assert evaluate(model, data, cfg, torch.device("cpu")) == first
    assert model.training  # evaluate put it back in the mode it found


def test_train_refuses_to_overwrite_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    model, cfg = deterministic_model()
    with pytest.raises(UserError, match="not a bytedeploy checkpoint"):
        train(model, FixedBatches(cfg), TrainConfig(steps=1), tmp_path, family="bgpt", model_config=cfg,
              device=torch.device("cpu"), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_resuming_with_the_training_state_of_another_model_is_a_user_error(tmp_path):
    model, cfg = deterministic_model()
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    state = {"optimizer": other.state_dict(), "step": 1, "rng": [training.rng_state(torch.device("cpu"))],
             "history": {"loss": [[1, 5.0]], "eval": [[0, 5.5]]}}
    with pytest.raises(UserError, match="does not fit this model") as err:
        train(model, FixedBatches(cfg), TrainConfig(steps=2), tmp_path / "run", family="bgpt", model_config=cfg,
              device=torch.device("cpu"), resume_state=state, progress=False)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ exact resume

RESUME_ARGS = ["--preset", "tiny", "--steps", "20", "--batch-size", "4", "--ckpt-every", "5", "--eval-every", "10",
               "--eval-batches", "1", "--warmup", "5", "--lr", "2e-3", "--set", "dropout=0.1",
               "--set", "patch_sampling_batch_size=24", "--no-progress"]


def train_args(data_dir, out):
    return ["train", "bgpt", "--data", str(data_dir), *RESUME_ARGS, "-o", str(out)]


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """20 uninterrupted steps, with dropout and random patch sampling so that the torch RNG matters."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = run_cli(train_args(data_dir, out))
    assert result.exit_code == 0, result.output
    return out


def interrupt_batches(monkeypatch, at_call: int, exc: type[BaseException]):
    """Make the data raise exc when the loop asks for its at_call-th training batch."""
    real_make_data = bgpt.make_data

    def make_data(*args, **kwargs):
        data = real_make_data(*args, **kwargs)
        real_batch, calls = data.train_batch, []

        def train_batch(rng, batch_size):
            calls.append(1)
            if len(calls) == at_call:
                raise exc()
            return real_batch(rng, batch_size)

        data.train_batch = train_batch
        return data

    monkeypatch.setattr(bgpt, "make_data", make_data)


def assert_same_run(resumed, full):
    """The resumed run re-creates the uninterrupted run's batches (seeded by step), torch RNG (saved per step) and
    optimizer state, and every op it runs is deterministic on the CPU (bGPT's patch embedding backs up through
    F.embedding, not an advanced-index accumulate): losses, eval losses and weights are equal bit for bit."""
    a, b = meta_of(resumed)["history"], meta_of(full)["history"]
    assert [s for s, _ in a["loss"]] == [s for s, _ in b["loss"]] == list(range(1, 21))
    assert a["lr"] == b["lr"]
    assert a["loss"] == b["loss"]
    assert [s for s, _ in a["eval"]] == [s for s, _ in b["eval"]] == [0, 10, 20]
    assert a["eval"] == b["eval"]
    wa, wb = weights_of(resumed), weights_of(full)
    assert wa.keys() == wb.keys()
    for k in wb:
        assert torch.equal(wa[k], wb[k]), k


def test_the_loop_applies_the_schedule(full_run):
    cfg = TrainConfig(**meta_of(full_run)["train_config"])
    assert meta_of(full_run)["history"]["lr"] == [[s + 1, lr_at(s, cfg)] for s in range(20)]


def test_exact_resume_after_keyboard_interrupt(data_dir, full_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_batches(monkeypatch, 13, KeyboardInterrupt)
    result = run_cli(train_args(data_dir, out))
    assert result.exit_code == 1  # click's "Aborted!"
    assert "interrupted: checkpoint of step 12" in result.output
    assert meta_of(out)["step"] == 12
    monkeypatch.undo()
    result = run_cli(["train", "bgpt", "--resume", "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_same_run(out, full_run)
    result = run_cli(["train", "bgpt", "--resume", "-o", str(out)])
    assert result.exit_code == 1 and "already reached step 20" in result.output


def test_ctrl_c_during_an_update_is_held_until_the_step_is_complete(data_dir, full_run, tmp_path, monkeypatch):
    real_make_optimizer, out = training.make_optimizer, tmp_path / "run"

    def make_optimizer(model, cfg):
        opt = real_make_optimizer(model, cfg)
        real_step, calls = opt.step, []

        def step(*args, **kwargs):
            calls.append(1)
            result = real_step(*args, **kwargs)
            if len(calls) == 13:  # weights updated, step counter not yet
                os.kill(os.getpid(), signal.SIGINT)
            return result

        opt.step = step
        return opt

    monkeypatch.setattr(training, "make_optimizer", make_optimizer)
    result = run_cli(train_args(data_dir, out))
    assert result.exit_code == 1
    assert "interrupted: checkpoint of step 13" in result.output
    monkeypatch.undo()
    assert run_cli(["train", "bgpt", "--resume", "-o", str(out), "--no-progress"]).exit_code == 0
    assert_same_run(out, full_run)


def test_exact_resume_from_a_periodic_checkpoint_after_a_crash(data_dir, full_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_batches(monkeypatch, 13, RuntimeError)
    result = run_cli(train_args(data_dir, out))
    assert isinstance(result.exception, RuntimeError)
    assert meta_of(out)["step"] == 10  # the last periodic checkpoint (every 5 steps)
    monkeypatch.undo()
    assert run_cli(["train", "bgpt", "--resume", "-o", str(out), "--no-progress"]).exit_code == 0
    assert_same_run(out, full_run)


# ------------------------------------------------------------------------------------------------ grad accumulation


class FixedBatches:
    """Always the same 8 files of different lengths: batch_size 8 gets them all, batch_size 4 alternates halves."""

    unit = "byte"

    def __init__(self, cfg):
        rng = np.random.default_rng(1)
        self.files = [bgpt.encode_file(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes(), "bin", cfg)
                      for n in (10, 200, 30, 400, 15, 60, 90, 700)]
        self.data = bgpt.PatchData(self.files, self.files, cfg)
        self.calls = 0

    def train_batch(self, rng, batch_size):
        if batch_size == 8:
            idx = np.arange(8)
        else:
            idx, self.calls = np.arange(4) + 4 * (self.calls % 2), self.calls + 1
        return self.data._collate(idx, self.files, None)

    def eval_batches(self, batch_size, max_batches):
        return self.data.eval_batches(batch_size, max_batches)


def deterministic_model():
    cfg = bgpt.Config(**dict(bgpt.PRESETS["tiny"], patch_sampling_batch_size=0, dropout=0.0))
    torch.manual_seed(0)
    return bgpt.Model(cfg), cfg


def test_two_micro_batches_of_4_give_the_gradient_of_one_batch_of_8(tmp_path):
    model, cfg = deterministic_model()
    data = FixedBatches(cfg)
    grads, counts = [], []
    for batch_size, accum in ((8, 1), (4, 2)):
        model.zero_grad()
        tcfg = TrainConfig(batch_size=batch_size, grad_accum=accum)
        loss_sum, n = forward_backward(model, data, tcfg, 0, torch.device("cpu"), training.DistInfo())
        grads.append({k: p.grad / n for k, p in model.named_parameters()})
        counts.append(n)
    assert counts[0] == counts[1]
    halves = [int((data.train_batch(None, 4)["masks"][:, 1:]).sum()) for _ in range(2)]
    assert halves[0] != halves[1]  # unequal halves: plain loss / grad_accum would weight them wrongly
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-4, atol=1e-7, msg=k)

    histories = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model, cfg = deterministic_model()
        tcfg = TrainConfig(steps=3, batch_size=batch_size, grad_accum=accum, warmup=1, eval_every=0, eval_batches=1)
        histories.append(train(model, FixedBatches(cfg), tcfg, tmp_path / f"b{batch_size}", family="bgpt",
                               model_config=cfg, device=torch.device("cpu"), progress=False))
    assert [loss for _, loss in histories[1]["loss"]] == pytest.approx(
        [loss for _, loss in histories[0]["loss"]], rel=1e-5)
    assert histories[1]["eval"][-1][1] == pytest.approx(histories[0]["eval"][-1][1], rel=1e-5)


# ------------------------------------------------------------------------------------------------ divergence


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    model, cfg = deterministic_model()
    data = bgpt.make_data(cfg, str(data_dir), {})
    real_forward, calls = model.forward, []

    def forward(batch):
        loss, n = real_forward(batch)
        if model.training:
            calls.append(1)
            if len(calls) == 5:
                loss = loss * float("nan")
        return loss, n

    model.forward = forward
    tcfg = TrainConfig(steps=8, batch_size=2, ckpt_every=2, eval_every=0, eval_batches=1)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="diverged at step 5: loss nan") as err:
        train(model, data, tcfg, out, family="bgpt", model_config=cfg, device=torch.device("cpu"), progress=False)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert "checkpoint of step 4" in str(err.value)
    assert meta_of(out)["step"] == 4 and len(meta_of(out)["history"]["loss"]) == 4
    assert all(torch.isfinite(v).all() for v in weights_of(out).values())
    assert [p.name for p in tmp_path.iterdir()] == ["run"]

    # through the CLI: a learning rate that blows the weights up
    result = run_cli(["train", "bgpt", "--data", str(data_dir), "--steps", "6", "--batch-size", "2", "--lr", "1e30",
                      "--warmup", "0", "--ckpt-every", "1", "--eval-batches", "1", "--no-progress",
                      "-o", str(tmp_path / "cli")])
    assert result.exit_code == 1
    error = result.output.splitlines()[-1]
    assert error.startswith("Error: training diverged at step ") and "is kept" in error
    assert read_checkpoint(tmp_path / "cli").meta["step"] == int(error.split("step ")[1].split(":")[0]) - 1


# ------------------------------------------------------------------------------------------------ DDP and entry points


def test_python_dash_m_runs_the_cli():
    for module in ("bytedeploy", "bytedeploy.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "bytedeploy, version" in out.stdout, out.stderr


RECORDER = """
import hashlib, os, runpy, sys
from bytedeploy.models import bgpt

record_dir = sys.argv.pop(1)
real_batch = bgpt.PatchData.train_batch

def train_batch(self, rng, batch_size):
    batch = real_batch(self, rng, batch_size)
    with open(os.path.join(record_dir, "rank%s.txt" % os.environ["RANK"]), "a") as f:
        f.write(hashlib.sha256(batch["patches"].numpy().tobytes()).hexdigest() + "\\n")
    return batch

bgpt.PatchData.train_batch = train_batch
runpy.run_module("bytedeploy.cli", run_name="__main__", alter_sys=True)  # what `python -m bytedeploy.cli` does
"""


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_on_two_cpu_ranks(data_dir, tmp_path):
    script = tmp_path / "recorder.py"
    script.write_text(textwrap.dedent(RECORDER))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), "train", "bgpt", "--preset", "tiny", "--data", str(data_dir), "--eval-split", "0.5",
           "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--ckpt-every", "2", "--no-progress",
           "--device", "cpu", "-o", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish in 240 s (a hang in a collective?)")
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and re.search(r"EADDRINUSE|address already in use|Failed to bind|rendezvous", log, re.I):
        pytest.skip(f"torchrun could not start here: {log[-300:]}")
    assert proc.returncode == 0, log[-3000:]
    assert proc.stdout.count("checkpoint saved to") == 1  # rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "rank0.txt", "rank1.txt", "recorder.py"]

    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    # every rank draws the step's whole batch of 2 x 4 rows and trains on its own 4 (tests/test_ddp.py)
    assert ranks[0] == ranks[1] and len(set(ranks[0])) == 4

    meta = meta_of(out)
    assert meta["step"] == 4 and meta["world_size"] == 2
    assert [s for s, _ in meta["history"]["eval"]] == [0, 2, 4]
    # eval was split between the ranks and all-reduced: it must equal one process evaluating every batch
    model, cfg, _ = load_model(out)
    data = bgpt.make_data(cfg, str(data_dir), {"eval_split": 0.5})
    assert len(data.evals) > 8  # at least two eval batches, so each rank evaluated a part
    tcfg = TrainConfig(**meta["train_config"])
    assert evaluate(model, data, tcfg, torch.device("cpu")) == pytest.approx(meta["history"]["eval"][-1][1], rel=1e-6)
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
