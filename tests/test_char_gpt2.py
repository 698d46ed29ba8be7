"""Char-level GPT-2 (GPT-burn): KV cache vs recompute, the two generation loops, the unknown symbol, the CLI."""

import json
import tempfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gpu_marks import gpu_test

from bytedeploy.cli import arch_overrides, build_model_config, cli
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import char_gpt2
from bytedeploy.sampling import SamplingConfig
from bytedeploy.tokenizers import CharTokenizer

GREEDY = SamplingConfig(temperature=0.0)


def make_model(block_size=8, vocab_size=12, seed=0, device="cpu") -> char_gpt2.Model:
    """A small model with weights large enough that its logits are far from ties (greedy is then robust)."""
    torch.manual_seed(seed)
    cfg = char_gpt2.Config(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16)
    model = char_gpt2.Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.to(device).eval()


def test_kv_cache_logits_equal_full_recompute():
    model = make_model(block_size=16)
    idx = torch.randint(0, 12, (2, 16))
    full = model.logits(idx)
    caches = model.transformer.make_caches(2, 16)
    with torch.no_grad():
        steps = [model.logits(idx[:, :5], caches, 0)]
        steps += [model.logits(idx[:, t:t + 1], caches, t) for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)  # fp32 on CPU


def test_greedy_eager_equals_reference_past_the_context():
    model = make_model(block_size=8)
    prompt, n_new = [1, 2, 3], 30  # 33 tokens: the window slides 25 times
    ref = char_gpt2.generate_reference(model, prompt, n_new, GREEDY, np.random.default_rng(0))
    eager = char_gpt2.generate_cached(model, prompt, n_new, GREEDY, batch_size=2)
    assert len(ref) == n_new
    assert eager.tolist() == [ref, ref]
    # a prompt longer than the context: both loops keep its last block_size tokens
    long_prompt = list(np.random.default_rng(1).integers(1, 12, size=20))
    ref = char_gpt2.generate_reference(model, long_prompt, 12, GREEDY, np.random.default_rng(0))
    assert char_gpt2.generate_cached(model, long_prompt, 12, GREEDY).tolist() == [ref]


def test_unknown_symbol_is_never_sampled():
    model = make_model(block_size=8)
    with torch.no_grad():
        model.lm_head.bias[0] = 20.0  # id 0, the unknown symbol, now has the highest logit everywhere
    assert (model.logits(torch.randint(0, 12, (4, 8))).argmax(-1) == 0).all()
    sampling = SamplingConfig(temperature=1.0, seed=3)
    eager = char_gpt2.generate_cached(model, [1, 2], 200, sampling, batch_size=4)
    ref = char_gpt2.generate_reference(model, [1, 2], 100, sampling, np.random.default_rng(3))
    greedy = char_gpt2.generate_cached(model, [1, 2], 20, GREEDY)
    assert eager.shape == (4, 200)
    assert not (eager == 0).any() and 0 not in ref and not (greedy == 0).any()
    assert len(set(eager.flatten().tolist())) > 5  # it really sampled


def test_generate_reads_the_tokenizer_asset(tmp_path):
    tok = CharTokenizer.from_text("abcdefghijk")
    (tmp_path / char_gpt2.TOKENIZER_FILE).write_bytes(tok.to_json())
    model = make_model(block_size=8, vocab_size=tok.vocab_size)
    request = GenerateRequest(b"abc", 20, 2, GREEDY, {"assets": str(tmp_path)})
    ref = char_gpt2.generate(model, model.cfg, request, "eager-reference")
    eager = char_gpt2.generate(model, model.cfg, request, "eager")
    assert eager.outputs == ref.outputs and len(ref.outputs) == 2
    assert all(len(o.decode()) == 20 and set(o.decode()) <= set("abcdefghijk") for o in ref.outputs)
    assert eager.n_new == 40 and eager.unit == "char"


def test_gpt_burn_defaults_and_cli_aliases():
    cfg = build_model_config(char_gpt2, "tiny", {})
    assert (cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.dropout) == (64, 64, 2, 2, 0.2)
    assert cfg == char_gpt2.Config()
    assert arch_overrides(char_gpt2, context=32, d_model=48, layers=3, heads=4) == \
        dict(block_size=32, n_embd=48, n_layer=3, n_head=4)
    toy = build_model_config(char_gpt2, "toy", {"vocab_size": 100})
    with torch.device("meta"):
        n = sum(p.numel() for p in char_gpt2.Model(toy).parameters())
    assert (toy.block_size, toy.n_layer, toy.n_head, toy.n_embd) == (128, 12, 12, 768)
    assert 80e6 < n < 90e6  # GPT-burn's "83M"


def test_invalid_utf8_corpus_is_a_one_line_error(tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"hello world\n" * 10 + b"caf\xe9\n")
    result = CliRunner().invoke(cli, ["train", "char-gpt2", "--data", str(bad), "--no-save", "--steps", "1"])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:")
    assert "not valid UTF-8" in lines[0] and "offset 123" in lines[0]


def test_first_mb_cut_inside_a_character_drops_it(tmp_path):
    from bytedeploy.data.text import load_text_split
    from bytedeploy.errors import UserError

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(("a" * 9 + "é" * 10).encode())  # 'é' is 2 bytes: a cut at 10 bytes falls inside the first one
    train, evals = load_text_split(str(corpus), 0.0, first_mb=10 / 1e6)
    assert train + evals == "a" * 9
    train, _ = load_text_split(str(corpus), 0.0, first_mb=11 / 1e6)
    assert train == "a" * 9 + "é"
    corpus.write_bytes(b"a" * 9 + b"\xc3")  # a file that itself ends inside a character is invalid
    with pytest.raises(UserError, match="offset 9"):
        load_text_split(str(corpus), 0.0)
    corpus.write_bytes(b"a" * 5 + b"\xff" + b"a" * 10)  # invalid bytes before the cut are still reported
    with pytest.raises(UserError, match="byte 0xff at offset 5"):
        load_text_split(str(corpus), 0.0, first_mb=10 / 1e6)


def test_cli_train_generate_eval(tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    result = runner.invoke(cli, ["train", "char-gpt2", "--preset", "tiny", "--first-mb", "1", "--steps", "50",
                                 "--batch-size", "32", "--lr", "3e-3", "--no-progress", "-o", str(ckpt)])
    assert result.exit_code == 0, result.output
    doc = json.loads((ckpt / "config.json").read_text())
    mc = doc["model_config"]
    assert (mc["block_size"], mc["n_embd"], mc["n_layer"], mc["n_head"], mc["dropout"]) == (64, 64, 2, 2, 0.2)
    tok = CharTokenizer.from_json((ckpt / "assets" / char_gpt2.TOKENIZER_FILE).read_bytes())
    assert mc["vocab_size"] == tok.vocab_size > 50
    evals = doc["meta"]["history"]["eval"]
    assert evals[0][0] == 0 and evals[-1][0] == 50
    assert evals[-1][1] < evals[0][1] - 0.5, evals  # nats per char

    args = ["generate", str(ckpt), "--prompt", "def ", "--max-new", "50", "--seed", "0"]
    first, again = runner.invoke(cli, args), runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout
    assert len(first.stdout) == 50 + 1  # 50 new characters, then echo's newline
    other = runner.invoke(cli, args[:-1] + ["1"])
    assert other.exit_code == 0 and other.stdout != first.stdout
    ref = runner.invoke(cli, args + ["--backend", "eager-reference"])
    assert ref.exit_code == 0, ref.output

    result = runner.invoke(cli, ["eval", str(ckpt), "--batches", "2"])
    assert result.exit_code == 0 and "bits per char" in result.output, result.output


def test_cli_no_save_writes_nothing(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "char-gpt2", "--first-mb", "0.2", "--steps", "2", "--no-save",
                                      "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "checkpoint not saved" in result.output
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert list(scratch.iterdir()) == []


@gpu_test()
def test_greedy_eager_equals_reference_on_cuda():
    model = make_model(block_size=8, device="cuda")
    ref = char_gpt2.generate_reference(model, [1, 2, 3], 30, GREEDY, np.random.default_rng(0))
    assert char_gpt2.generate_cached(model, [1, 2, 3], 30, GREEDY, batch_size=2).tolist() == [ref, ref]
