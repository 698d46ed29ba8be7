"""Bayesian Flow Network LM: the L^inf loss by hand, the sampler (truthful network, conditioning, eager vs the
seed's loop), the sentencepiece tokenizer, and train -> generate through the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from gpu_marks import gpu_test

from bytedeploy.checkpoint import load_model
from bytedeploy.cli import cli
from bytedeploy.data.sentencepiece_tokenizer import load_sentencepiece, tokenizer_cli, train_sentencepiece
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bfn
from bytedeploy.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)
CORPUS = "".join(f"def f_{i}(x, y={i % 7}):\n    return x * {i} + y  # value {i * 31}\n\nclass C{i}:\n    pass\n"
                 for i in range(300))


def small_config(**kw) -> bfn.Config:
    values = dict(vocab_size=24, seq_len=10, n_layer=2, n_head=2, n_embd=16, time_dim=8, dropout=0.0, n_steps=15)
    values.update(kw)
    return bfn.Config(**values)


class FakeNet(nn.Module):
    """Stands in for bfn.Model in the samplers: records every (theta, t) it is given and returns fixed logits
    (logits_fn(theta) -> (B, L, K))."""

    def __init__(self, cfg: bfn.Config, logits_fn):
        super().__init__()
        self.cfg = cfg
        self.anchor = nn.Parameter(torch.zeros(1))  # the samplers read the device off the parameters
        self.logits_fn = logits_fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def logits(self, theta, t):
        self.calls.append((theta.detach().cpu().clone(), t.detach().cpu().clone()))
        return self.logits_fn(theta)


def truth_logits(truth: torch.Tensor, K: int, scale: float = 30.0):
    def fn(theta):
        return (scale * nn.functional.one_hot(truth.to(theta.device), K).float()).expand(theta.size(0), -1, -1)
    return fn


# ----------------------------------------------------------------------------------------------- loss


def test_matched_beta_reproduces_the_paper_and_seed():
    assert bfn.matched_beta_1(27) == pytest.approx(0.75, rel=1e-9)  # the paper's text8 value
    assert bfn.matched_beta_1(8000) == pytest.approx(0.005, rel=0.1)  # the seed's hand-picked value
    assert bfn.matched_beta_1(256) > bfn.matched_beta_1(512) > bfn.matched_beta_1(8000)
    assert small_config().beta == bfn.matched_beta_1(24) and small_config(beta_1=3.0).beta == 3.0


def test_loss_matches_hand_computation():
    K, L, beta_1 = 5, 3, 2.0
    model = bfn.Model(small_config(vocab_size=K, seq_len=L, beta_1=beta_1))
    fixed_logits = torch.tensor(np.random.default_rng(0).normal(size=(2, L, K)), dtype=torch.float32)
    seen = {}

    def trivial_network(theta, t):
        seen["theta"], seen["t"] = theta, t
        return fixed_logits

    model.logits = trivial_network
    ids = torch.tensor([[0, 3, 4], [2, 2, 1]])
    cond = torch.tensor([[False, False, False], [True, False, False]])
    t = torch.tensor([0.3, 0.8])
    noise = torch.tensor(np.random.default_rng(1).normal(size=(2, L, K)), dtype=torch.float32)
    loss, n = model({"ids": ids, "cond": cond, "t": t, "noise": noise})

    e_x = np.eye(K)[ids.numpy()]
    beta = beta_1 * t.numpy()[:, None, None] ** 2
    y = beta * (K * e_x - 1) + np.sqrt(beta * K) * noise.numpy()
    theta = np.exp(y) / np.exp(y).sum(-1, keepdims=True)
    theta[1, 0] = e_x[1, 0]  # the conditioned position sees its token for certain ...
    np.testing.assert_allclose(seen["theta"].numpy(), theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen["t"].numpy(), [[0.3, 0.3, 0.3], [1.0, 0.8, 0.8]])  # ... at time 1
    e_hat = np.exp(fixed_logits.numpy()) / np.exp(fixed_logits.numpy()).sum(-1, keepdims=True)
    per_token = K * beta_1 * t.numpy()[:, None] * ((e_x - e_hat) ** 2).sum(-1)
    expected = per_token[~cond.numpy()].mean()  # and carries no loss
    assert n == 5
    assert float(loss) == pytest.approx(expected, rel=1e-5)

    # with uniform output, ||e_x - 1/K||^2 = 1 - 1/K whatever the noise: loss = beta_1 t (K - 1) per token
    model.logits = lambda theta, t: torch.zeros(theta.shape)
    loss, n = model({"ids": ids, "t": t})
    assert n == 6 and float(loss) == pytest.approx(beta_1 * (K - 1) * float(t.mean()), rel=1e-6)


# ----------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("backend", ["eager", "eager-reference"])
def test_truthful_network_drives_theta_to_the_truth(backend):
    K, L = 16, 10
    cfg = small_config(vocab_size=K, seq_len=L, beta_1=3.0)  # beta K = 48: theta(1) is certain of its token
    truth = torch.tensor(np.random.default_rng(0).integers(0, K, size=L))
    net = FakeNet(cfg, truth_logits(truth, K))
    fixed = torch.zeros(L, dtype=torch.bool)
    loop = bfn.generate_eager if backend == "eager" else bfn.generate_reference
    out = loop(net, torch.zeros(L, dtype=torch.long), fixed, 40, SamplingConfig(temperature=1.0, seed=5), 3)
    assert out.tolist() == [truth.tolist()] * 3
    assert len(net.calls) == 41
    first, last = net.calls[0][0], net.calls[-1][0]
    torch.testing.assert_close(first, torch.full((3, L, K), 1.0 / K))
    assert (last.argmax(-1) == truth).all() and (last.gather(-1, truth.expand(3, -1)[..., None]) > 0.99).all()
    truth_prob = [theta[..., truth].diagonal(dim1=-2, dim2=-1).mean() for theta, _ in net.calls]
    assert truth_prob[len(truth_prob) // 2] < truth_prob[-1]  # the flow gathers certainty over the steps
    assert [float(t[0, 0]) for _, t in net.calls] == pytest.approx([i / 40 for i in range(40)] + [1.0])


@pytest.mark.parametrize("backend", ["eager", "eager-reference"])
def test_conditioned_positions_never_change(backend):
    K, L = 12, 10
    cfg = small_config(vocab_size=K, seq_len=L)
    gen = torch.Generator().manual_seed(0)
    net = FakeNet(cfg, lambda theta: torch.randn(theta.shape, generator=gen) * 3)  # an arbitrary network
    ids = torch.tensor([5, 7, 0, 0, 0, 11, 0, 0, 0, 2])
    fixed = torch.tensor([True, True, False, False, False, True, False, False, False, True])  # prefix + holes
    loop = bfn.generate_eager if backend == "eager" else bfn.generate_reference
    out = loop(net, ids, fixed, 20, SamplingConfig(temperature=1.0, seed=1), 4)
    one_hot = nn.functional.one_hot(ids[fixed], K).float()
    for theta, t in net.calls:
        assert torch.equal(theta[:, fixed], one_hot.expand(4, -1, -1))  # exactly one-hot, every step
        assert (t[:, fixed] == 1.0).all()
    assert (out[:, fixed] == ids[fixed]).all()
    assert len(set(out[:, ~fixed].flatten().tolist())) > 3  # the free positions really were sampled


def random_model(cfg: bfn.Config, std: float = 0.3) -> bfn.Model:
    torch.manual_seed(0)
    model = bfn.Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def test_greedy_eager_equals_the_seeds_loop():
    """Temperature 0 removes the categorical randomness; both loops compute the same Gaussian sender noise from the
    seed (bfn.update_noise), so their tokens agree exactly."""
    model = random_model(small_config())
    ids = torch.tensor([3, 9, 14] + [0] * 7)
    fixed = torch.arange(10) < 3
    for seed in (0, 1):
        greedy = SamplingConfig(temperature=0.0, seed=seed)
        eager = bfn.generate_eager(model, ids, fixed, 15, greedy, 2)
        ref = bfn.generate_reference(model, ids, fixed, 15, greedy, 2)
        assert torch.equal(eager, ref)
        assert (eager[:, :3] == ids[:3]).all()
    # sampled at temperature 1 the two differ in their categorical draws but both keep the prompt
    sampled = SamplingConfig(temperature=1.0, top_k=5, seed=2)
    for loop in (bfn.generate_eager, bfn.generate_reference):
        assert (loop(model, ids, fixed, 15, sampled, 2)[:, :3] == ids[:3]).all()


@gpu_test()
def test_eager_on_cuda_converges_and_keeps_the_prompt():
    K, L = 16, 10
    cfg = small_config(vocab_size=K, seq_len=L, beta_1=3.0)
    truth = torch.tensor(np.random.default_rng(0).integers(0, K, size=L))
    net = FakeNet(cfg, truth_logits(truth, K)).cuda()
    fixed = torch.arange(L) < 3
    out = bfn.generate_eager(net, truth, fixed, 40, SamplingConfig(temperature=1.0), 2)
    assert out.device.type == "cuda" and out.cpu().tolist() == [truth.tolist()] * 2
    model = random_model(small_config()).cuda()
    out = bfn.generate_eager(model, torch.arange(10), fixed, 15, SamplingConfig(temperature=1.0), 2)
    assert (out[:, :3].cpu() == torch.arange(3)).all()


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_cli_special_ids_and_digits(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    runner = CliRunner()
    result = runner.invoke(tokenizer_cli, ["train", "--data", str(corpus), "--vocab-size", "80",
                                           "-o", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    sp = load_sentencepiece(tmp_path / "tok.model")
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.vocab_size() == 80
    for d in "0123456789":
        assert len(sp.encode(d)) == 1 and sp.id_to_piece(sp.encode(d)[0]) == d
    assert [sp.id_to_piece(i) for i in sp.encode("2024")] == ["2", "0", "2", "4"]
    code = "def f_7(x, y=3):\n    return x * 7 + y\n"
    assert sp.decode(sp.encode(code)) == code  # newlines and indentation survive

    # mounted as 'bytedeploy tokenizer'
    result = runner.invoke(cli, ["tokenizer", "train", "--data", str(corpus), "--vocab-size", "60",
                                 "-o", str(tmp_path / "via_main.model")])
    assert result.exit_code == 0 and "60-piece BPE tokenizer" in result.output, result.output
    assert load_sentencepiece(tmp_path / "via_main.model").vocab_size() == 60

    # bad input: one-line errors, exit status 1
    other = str(tmp_path / "other")
    for args, message in [(["--data", str(tmp_path / "missing.txt"), "-o", other], "data path not found"),
                          (["--data", str(corpus), "--vocab-size", "8", "-o", other], "too small"),
                          (["--data", str(corpus), "--vocab-size", "5000", "-o", other], "Vocabulary size too high"),
                          (["--data", str(corpus), "-o", str(tmp_path / "tok.model")], "exists; use --force")]:
        result = runner.invoke(tokenizer_cli, ["train", *args])
        assert result.exit_code == 1 and "Error: " in result.output and message in result.output, result.output
    assert not (tmp_path / "other.model").exists()

    # a given tokenizer sets the model's vocabulary and beta
    cfg = bfn.prepare_config(bfn.Config(**bfn.PRESETS["tiny"]), str(corpus), {"tokenizer": tmp_path / "tok.model"})
    assert cfg.vocab_size == 80 and cfg.beta_1 == pytest.approx(bfn.matched_beta_1(80))
    path = train_sentencepiece(CORPUS, 60, tmp_path / "direct.model")
    assert load_sentencepiece(path.read_bytes()).vocab_size() == 60


# ----------------------------------------------------------------------------------------------- end to end


def test_cli_trains_a_tokenizer_and_model_then_generates(tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "bfn", "--preset", "tiny", "--steps", "40", "--first-mb", "1",
                                 "--eval-every", "0", "--lr", "2e-3", "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "eval loss:" in result.output and (out / "assets" / "tokenizer.model").is_file()
    doc = json.loads((out / "config.json").read_text())
    evals = doc["meta"]["history"]["eval"]
    assert evals[-1][1] < evals[0][1] - 0.1, evals  # same eval times, noise and masks: the loss fell
    cfg = doc["model_config"]
    assert cfg["vocab_size"] == 256 and math.isclose(cfg["beta_1"], bfn.matched_beta_1(256))

    result = runner.invoke(cli, ["generate", str(out), "--prompt", "def ", "--max-new", "16"])
    assert result.exit_code == 0, result.output
    assert "eager: 16 tokens" in result.output and "passes per token" in result.output
    result = runner.invoke(cli, ["generate", str(out), "--prompt", "def ", "--max-new", "100"])
    assert result.exit_code == 1 and "does not fit" in result.output
    result = runner.invoke(cli, ["generate", str(out), "--prompt", "def ", "--max-new", "16", "--steps", "10"])
    assert result.exit_code == 0 and "0.688 passes per token" in result.output, result.output  # 11 passes / 16
    result = runner.invoke(cli, ["generate", str(out), "--infill", "def [[4]](self):\n[[6]]", "--steps", "10"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("def ") and result.stdout.index("(self):\n") >= 4
    assert "eager: 10 tokens" in result.stderr
    for flags, message in [(["--infill", "no holes"], "at least one hole"),
                           (["--infill", "x [[2]]", "--prompt", "y"], "either a prompt or an infill"),
                           (["--n-orders", "2"], "--n-orders is a sigma-gpt option; this is a bfn model")]:
        result = runner.invoke(cli, ["generate", str(out), *flags])
        assert result.exit_code == 1 and message in result.output, result.output

    model, cfg, ckpt = load_model(out)
    options = {"assets": str(ckpt.assets), "n_steps": 20}
    request = GenerateRequest(b"import os\n", 12, 2, GREEDY, options)
    ref = bfn.generate(model, cfg, request, "eager-reference")
    eager = bfn.generate(model, cfg, request, "eager")
    assert eager.outputs == ref.outputs and eager.n_new == 24 and eager.passes == 21
    infill = GenerateRequest(b"", 0, 1, SamplingConfig(seed=3), dict(options, infill=["def ", 4, "(self):\n", 6]))
    text = bfn.generate(model, cfg, infill, "eager").outputs[0].decode()
    assert text.startswith("def ") and text.index("(self):\n") >= 4
