"""σ-GPT: the double positional encoding, KV-cache decoding in any order, and burst (rejection) sampling."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from gpu_marks import gpu_test

from bytedeploy.cli import cli
from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import sigma_gpt as sg
from bytedeploy.models.layers import GPT2Stack, GPT2StackConfig
from bytedeploy.models.sampling import make_generator
from bytedeploy.sampling import SamplingConfig
from bytedeploy.tokenizers import CharTokenizer

GREEDY = SamplingConfig(temperature=0.0)


def small_model(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, seed=0) -> sg.Model:
    torch.manual_seed(seed)
    cfg = sg.Config(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    dropout=0.0)
    return sg.Model(cfg).eval()


def sharpen(model: sg.Model, seed=0, emb_std=1.5) -> sg.Model:
    """Random weights large enough that the conditionals are peaked and differ between orders."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)  # LayerNorm gains
            else:
                p.normal_(0, 0.2)
        model.wte.weight.normal_(0, emb_std)
    return model


def assets_with_tokenizer(tmp_path, text: str):
    tok = CharTokenizer.from_text(text)
    (tmp_path / sg.TOKENIZER_FILE).write_bytes(tok.to_json())
    return tok, str(tmp_path)


def test_left_to_right_is_a_gpt_with_concatenated_position_table():
    model = small_model()
    cfg = model.cfg
    B, T = 3, cfg.block_size
    window = torch.randint(cfg.vocab_size, (B, T + 1))
    batch = {"idx": window[:, :-1], "targets": window[:, 1:]}
    # the equivalent plain GPT: same blocks, full-width learned positions wpe'[i] = concat(pos(i), pos(i+1))
    gpt = GPT2Stack(GPT2StackConfig(cfg.n_layer, cfg.n_head, cfg.n_embd, T)).eval()
    state = {k: v for k, v in model.transformer.state_dict().items() if k != "wpe.weight"}
    gpt.load_state_dict(state, strict=False)
    wpe = model.transformer.wpe.weight
    with torch.no_grad():
        gpt.wpe.weight.copy_(torch.cat([wpe[:T], wpe[1:T + 1]], -1))
        expected = model.lm_head(gpt(model.wte(batch["idx"])))
        identity = torch.arange(T + 1).expand(B, -1)
        logits, targets = model.sequence_logits(window, identity)
        loss, n = model(dict(batch, order=identity))
    assert torch.equal(targets, batch["targets"])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(expected.reshape(-1, cfg.vocab_size), targets.reshape(-1)),
                               atol=1e-5, rtol=1e-5)
    assert n == B * T
    # a left-to-right config draws the identity; a shuffling one draws other orders but a fixed set in eval mode
    shuffled = sg.Model(sg.Config(**dict(vars(cfg), order="shuffle"))).eval()
    ltr = sg.Model(sg.Config(**dict(vars(cfg), order="left-to-right")))
    assert torch.equal(ltr.draw_orders(B, T + 1, "cpu"), identity)
    eval_orders = shuffled.draw_orders(B, T + 1, "cpu")
    assert torch.equal(eval_orders, shuffled.draw_orders(B, T + 1, "cpu"))
    assert not torch.equal(eval_orders, identity)
    assert torch.equal(eval_orders.sort(-1).values, identity)


@torch.no_grad()
def test_kv_cache_decoding_equals_full_recompute_in_a_random_order():
    model = sharpen(small_model(), emb_std=1.0)
    L = model.cfg.block_size + 1
    gen = torch.Generator().manual_seed(1)
    window = torch.randint(model.cfg.vocab_size, (2, L), generator=gen)
    order = torch.stack([torch.randperm(L, generator=gen) for _ in range(2)])
    full, _ = model.sequence_logits(window, order)  # (2, L-1, V)
    seq = window.gather(1, order)
    caches = model.transformer.make_caches(2, L)
    P = 3  # prefill three tokens, then one token per step
    steps = [model.logits(seq[:, :P], order[:, :P], order[:, 1:P + 1], caches, 0)]
    for i in range(P, L - 1):
        steps.append(model.logits(seq[:, i:i + 1], order[:, i:i + 1], order[:, i + 1:i + 2], caches, i))
    # fp32, same weights, different kernels (masked SDPA over the cache vs one causal pass): 1e-5 absolute
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # the burst proposal query: the last known token asked about every remaining position at once, each query
    # seeing the cache and itself, equals recomputing the whole prefix with that position next
    n = 4
    caches = model.transformer.make_caches(2, L)
    model.logits(seq[:, :n - 1], order[:, :n - 1], order[:, 1:n], caches, 0)
    rest = order[:, n:]
    R = rest.size(1)
    mask = torch.cat([torch.ones(R, n - 1, dtype=torch.bool), torch.eye(R, dtype=torch.bool)], 1)
    burst = model.logits(seq[:, n - 1:n].expand(-1, R), order[:, n - 1:n].expand(-1, R), rest, caches, n - 1, mask)
    for r in range(R):
        follow = torch.cat([order[:, 1:n], rest[:, r:r + 1]], 1)
        expected = model.logits(seq[:, :n], order[:, :n], follow)[:, -1]
        torch.testing.assert_close(burst[:, r], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", ["left-to-right", "random"])
def test_greedy_eager_equals_eager_reference(tmp_path, order):
    text = "def sample(x):\n    return x + 1\n"
    tok, assets = assets_with_tokenizer(tmp_path, text)
    model = sharpen(small_model(vocab_size=tok.vocab_size, block_size=16, n_embd=32), emb_std=0.8)
    request = GenerateRequest(prompt=b"def", max_new=12, batch_size=2, sampling=GREEDY,
                              options={"assets": assets, "order": order})
    eager = sg.generate(model, model.cfg, request, "eager")
    reference = sg.generate(model, model.cfg, request, "eager-reference")
    assert eager.outputs == reference.outputs
    assert all(len(o.decode()) == 12 for o in eager.outputs)
    assert eager.n_new == 24 and eager.passes == 24  # one pass per character and row
    # a different order of the same model gives a different greedy sample (the order is used, not ignored)
    if order == "random":
        ltr = sg.generate(model, model.cfg, GenerateRequest(b"def", 12, 1, GREEDY, {"assets": assets}), "eager")
        assert ltr.outputs[0] != eager.outputs[0]


@torch.no_grad()
def test_burst_greedy_tokens_are_the_greedy_conditionals_along_its_order():
    """With several orders the kept order's cache entries are copied between the order copies; a wrong copy
    would change later conditionals. Greedy burst must equal greedy decoding along the order it took."""
    model = sharpen(small_model(vocab_size=5, block_size=12), emb_std=1.0)
    prompt = [1, 3]
    seq, generated_at, passes = sg.sample_burst(model, prompt, 11, 3, GREEDY, make_generator(0, "cpu"),
                                                sg.order_rng(0), n_orders=4)
    assert torch.equal(generated_at.sort(-1).values, torch.arange(13).expand(3, -1))
    replay = sg.sample_cached(model, prompt, generated_at, GREEDY, make_generator(0, "cpu"))
    assert torch.equal(seq, replay)
    assert passes < 2 * 11


def random_order_distribution(model: sg.Model, prompt: list[int], n_new: int) -> torch.Tensor:
    """Exact probability of every continuation under random-order autoregressive sampling: the average over all
    orders of the remaining positions of the product of the model's conditionals (full recompute, float64)."""
    V, P = model.cfg.vocab_size, len(prompt)
    conts = torch.tensor(list(itertools.product(range(V), repeat=n_new)))
    windows = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], 1)
    total = torch.zeros(len(conts), dtype=torch.float64)
    orders = list(itertools.permutations(range(P, P + n_new)))
    with torch.no_grad():
        for perm in orders:
            order = torch.tensor([*range(P), *perm]).expand(len(conts), -1)
            logits, targets = model.sequence_logits(windows, order)
            logp = torch.log_softmax(logits.double(), -1).gather(2, targets[..., None])[..., 0]
            total += logp[:, P - 1:].sum(1).exp()
    return total / len(orders)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Goodness of fit; cells expecting fewer than min_expected draws are pooled into one."""
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    try:
        from scipy.stats import chi2

        return float(chi2.sf(stat, df))
    except ImportError:
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))


@torch.no_grad()
def test_burst_samples_follow_random_order_autoregressive_distribution():
    """Vocab 3, 3 new positions after a 1-token prompt: 27 continuations, exact probabilities by enumeration
    over the 6 orders. 4,100 burst samples (n_orders=1, the exact setting) must fit at p > 0.001 (fixed seeds).
    Large batches exercise the cut-to-the-batch-minimum path, batches of 5 the long accepted runs."""
    model = sharpen(small_model(vocab_size=3, block_size=3, n_layer=1, n_embd=8))
    prompt, n_new = [1], 3
    probs = random_order_distribution(model, prompt, n_new)
    assert abs(float(probs.sum()) - 1) < 1e-9
    digits = 3 ** torch.arange(n_new - 1, -1, -1)

    def counts_of(n_orders, plan):
        gen, rng = make_generator(0, "cpu"), sg.order_rng(0)
        counts = torch.zeros(len(probs), dtype=torch.long)
        for batch, calls in plan:
            for _ in range(calls):
                seq, _, _ = sg.sample_burst(model, prompt, n_new, batch, SamplingConfig(), gen, rng, n_orders)
                counts += torch.bincount((seq[:, 1:] * digits).sum(1), minlength=len(probs))
        return counts.numpy()

    p_value = chi_square_p_value(counts_of(1, [(2000, 2), (5, 20)]), probs.numpy())
    assert p_value > 1e-3, p_value
    # the test has power: keeping the longest of 4 orders (not exact, see the module docstring) is detected
    assert chi_square_p_value(counts_of(4, [(2000, 2)]), probs.numpy()) < 1e-6


def test_burst_needs_fewer_passes_than_tokens_on_a_confident_model(tmp_path):
    tok, assets = assets_with_tokenizer(tmp_path, "abc")
    model = small_model(vocab_size=tok.vocab_size, block_size=32)
    with torch.no_grad():  # the final LayerNorm outputs a constant that the tied head maps to 'c' with certainty
        model.transformer.ln_f.weight.zero_()
        c = model.wte.weight[tok.encode("c")[0]]
        model.transformer.ln_f.bias.copy_(100 * c / c.dot(c))  # logit 100 for 'c', about 100·cos·|e|/|c| others
    request = GenerateRequest(prompt=b"ab", max_new=24, batch_size=2, sampling=SamplingConfig(seed=3),
                              options={"assets": assets})
    burst = sg.generate(model, model.cfg, request, "burst")
    assert burst.outputs == [b"c" * 24] * 2
    assert burst.n_new == 48
    assert burst.passes < burst.n_new / 4  # prompt pass + one propose/score iteration, per row
    eager = sg.generate(model, model.cfg, request, "eager")
    assert eager.outputs == burst.outputs and eager.passes == eager.n_new


def test_generate_rejects_bad_requests(tmp_path):
    tok, assets = assets_with_tokenizer(tmp_path, "abc")
    model = small_model(vocab_size=tok.vocab_size, block_size=8)
    with pytest.raises(UserError, match="at most 8"):
        sg.generate(model, model.cfg, GenerateRequest(b"a", 9, options={"assets": assets}), "burst")
    with pytest.raises(UserError, match="generation order"):
        sg.generate(model, model.cfg, GenerateRequest(b"a", 4, options={"assets": assets, "order": "zigzag"}))
    with pytest.raises(UserError, match="tokenizer"):
        sg.generate(model, model.cfg, GenerateRequest(b"a", 4))
    with pytest.raises(UserError, match="backend"):
        sg.generate(model, model.cfg, GenerateRequest(b"a", 4, options={"assets": assets}), "onnx")
    # a long prompt keeps its last characters so that prompt and new characters fit in block_size + 1
    out = sg.generate(model, model.cfg, GenerateRequest(b"abcabcabcabc", 5, options={"assets": assets}), "burst")
    assert len(out.outputs[0].decode()) == 5


def test_cli_train_lowers_loss_and_burst_generates(tmp_path):
    out = tmp_path / "ckpt"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "sigma-gpt", "--preset", "tiny", "--steps", "25", "--order", "shuffle",
                                 "--lr", "3e-3", "--warmup", "5", "--eval-every", "0", "--ckpt-every", "0",
                                 "--eval-batches", "2", "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "config.json").read_text())
    assert doc["model_config"]["order"] == "shuffle"
    history = doc["meta"]["history"]["eval"]
    assert history[-1][1] < history[0][1] - 0.3, history
    assert history[0][1] == pytest.approx(math.log(doc["model_config"]["vocab_size"]), abs=0.5)
    assert (out / "assets" / sg.TOKENIZER_FILE).is_file()
    result = runner.invoke(cli, ["generate", str(out), "--backend", "burst", "--max-new", "32", "--prompt", "def "])
    assert result.exit_code == 0, result.output
    assert "burst: 32 chars" in result.stderr and "passes per char" in result.stderr

    # the family's generate flags reach the sampler: the CLI prints what the same request gives directly (both on the
    # CPU: a GPU draws another random stream)
    from bytedeploy.checkpoint import load_model

    model, cfg, ckpt = load_model(out)
    for flags, backend, options in [(["--n-orders", "1"], "burst", {"n_orders": 1}),
                                    (["--gen-order", "random"], "eager", {"order": "random"})]:
        result = runner.invoke(cli, ["generate", str(out), "--backend", backend, "--max-new", "32", "--prompt",
                                     "def ", "--seed", "5", "--device", "cpu", *flags])
        assert result.exit_code == 0, result.output
        request = GenerateRequest(b"def ", 32, 1, SamplingConfig(seed=5), dict(options, assets=str(ckpt.assets)))
        assert result.stdout == sg.generate(model, cfg, request, backend).outputs[0].decode() + "\n"
    for flags, message in [(["--n-orders", "2"], "applies to --backend burst"),
                           (["--backend", "burst", "--gen-order", "random"], "burst draws its own"),
                           (["--steps", "10"], "--steps is a bfn option; this is a sigma-gpt model")]:
        result = runner.invoke(cli, ["generate", str(out), *flags])
        assert result.exit_code == 1 and message in result.output, result.output


@gpu_test()
def test_sampling_on_cuda_matches_cpu(tmp_path):
    text = "def sample(x):\n    return x + 1\n"
    tok, assets = assets_with_tokenizer(tmp_path, text)
    model = sharpen(small_model(vocab_size=tok.vocab_size, block_size=16, n_embd=32), emb_std=0.8)
    request = GenerateRequest(b"def", 12, 2, GREEDY, {"assets": assets, "order": "random"})
    cpu = sg.generate(model, model.cfg, request, "eager")
    model.cuda()
    assert sg.generate(model, model.cfg, request, "eager").outputs == cpu.outputs
    assert sg.generate(model, model.cfg, request, "eager-reference").outputs == cpu.outputs
    burst = sg.generate(model, model.cfg, GenerateRequest(b"def", 12, 2, SamplingConfig(), {"assets": assets}),
                        "burst")
    assert [len(o.decode()) for o in burst.outputs] == [12, 12] and burst.passes > 0
    with torch.no_grad():
        seq, generated_at, _ = sg.sample_burst(model, [1, 3], 12, 3, GREEDY, make_generator(0, "cuda"),
                                               sg.order_rng(0), n_orders=4)
        replay = sg.sample_cached(model, [1, 3], generated_at, GREEDY, make_generator(0, "cuda"))
    assert torch.equal(seq, replay)
