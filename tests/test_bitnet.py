"""BitNet: BitLinear quantizers and STE, ternary packing, the integer reference path, replace_linears, the byte
model's KV cache and generation loops, its data, and training + generation through the CLI."""

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from gpu_marks import gpu_test

from bytedeploy.cli import build_model_config, cli
from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bitnet
from bytedeploy.models.bitlinear import (
    MODES,
    BitLinear,
    bitlinear_int,
    pack_ternary,
    quantize_activations,
    quantize_weights,
    replace_linears,
    unpack_ternary,
)
from bytedeploy.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)
SHAPES = [(13, 7), (64, 32), (130, 257), (1024, 24)]  # (in, out): in_features not divisible by 4 included


def make_layer(in_features, out_features, mode, seed=0) -> BitLinear:
    torch.manual_seed(seed)
    layer = BitLinear(in_features, out_features, mode)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)  # a trained-looking gain, not the identity
    return layer


def make_model(mode="b1.58", block_size=16, seed=0) -> bitnet.Model:
    """A small model whose logits are far from ties (greedy decoding is then robust to float rounding)."""
    torch.manual_seed(seed)
    cfg = bitnet.Config(block_size=block_size, n_layer=2, n_head=2, n_embd=32, ffn_hidden=64, mode=mode)
    model = bitnet.Model(cfg)
    with torch.no_grad():
        model.tok_emb.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 1.0)
    return model.eval()


# ----------------------------------------------------------------------------------------------- quantizers


def test_b158_weights_are_ternary_times_absmean():
    w = torch.randn(48, 40) * 0.05
    w_int, beta = quantize_weights(w, "b1.58")
    assert w_int.dtype == torch.int8 and set(w_int.unique().tolist()) == {-1, 0, 1}
    torch.testing.assert_close(beta, w.abs().mean())
    torch.testing.assert_close(w_int.float(), (w / beta).round().clamp(-1, 1))
    layer = BitLinear(40, 48, "b1.58")
    with torch.no_grad():
        layer.weight.copy_(w)
    packed, scale, _ = layer.export_int()
    b = float(beta)
    assert float(scale) == b and set((unpack_ternary(packed, 40).float() * scale).unique().tolist()) == {-b, 0.0, b}


def test_b1_weights_are_signs_of_centred_weights_times_absmean():
    w = torch.randn(48, 40) * 0.05 + 0.01  # off-centre: sign(W) and sign(W - mean W) differ somewhere
    w_int, beta = quantize_weights(w, "b1")
    assert set(w_int.unique().tolist()) == {-1, 1}
    assert torch.equal(w_int == 1, w > w.mean())
    assert not torch.equal(w_int == 1, w > 0)
    torch.testing.assert_close(beta, w.abs().mean())


def test_activations_are_int8_absmax_per_token():
    x = torch.randn(3, 5, 33) * torch.logspace(-3, 2, 5)[None, :, None]  # tokens of very different sizes
    x_int, scale = quantize_activations(x)
    assert x_int.dtype == torch.int8 and scale.shape == (3, 5, 1)
    assert (x_int.abs().amax(-1) == 127).all()  # each token's largest entry maps to +-127
    err = (x_int.float() / scale - x).abs()
    assert (err <= 0.5 / scale + 1e-7).all()  # round-to-nearest: half a step at most


# ----------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(5, 13), (3, 4), (7, 1), (16, 130), (2, 3, 9)])
def test_pack_unpack_round_trip(shape):
    w = torch.randint(-1, 2, shape, dtype=torch.int8)
    packed = pack_ternary(w)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], -(-shape[-1] // 4))
    assert torch.equal(unpack_ternary(packed, shape[-1]), w)
    binary = torch.where(torch.rand(shape) > 0.5, 1, -1).to(torch.int8)  # b1 weights use the same code
    assert torch.equal(unpack_ternary(pack_ternary(binary), shape[-1]), binary)


def test_pack_code_and_padding_are_as_documented():
    # 0 -> 0b00, +1 -> 0b01, -1 -> 0b10, input 4j + i in bits 2i..2i+1 of byte j; padding is code 0b00
    w = torch.tensor([[1, -1, 0, 1, -1, -1]], dtype=torch.int8)
    byte0 = 0b01 | 0b10 << 2 | 0b00 << 4 | 0b01 << 6
    byte1 = 0b10 | 0b10 << 2
    assert pack_ternary(w).tolist() == [[byte0, byte1]]
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([[2, 0]], dtype=torch.int8))
    with pytest.raises(ValueError):
        unpack_ternary(pack_ternary(w), 9)  # 2 bytes do not hold 9 values


# ----------------------------------------------------------------------------------------------- integer path


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_integer_path_equals_fake_quant(mode, in_features, out_features):
    layer = make_layer(in_features, out_features, mode)
    x = torch.randn(3, 5, in_features) * 2
    x_normed = layer.norm(x)
    packed, w_scale, gain = layer.export_int()
    assert torch.equal(gain, layer.norm.weight.detach())
    y_int = bitlinear_int(x_normed, packed, w_scale, in_features)
    # The integer sums are exact, so against the fake-quant product computed in float64 only the float32 rounding
    # of the final rescale remains: a few float32 ulps (rtol 1e-6; atol for outputs whose integer sum is 0).
    x_int, act_scale = quantize_activations(x_normed)
    w_int, beta = quantize_weights(layer.weight, mode)
    y64 = F.linear(x_int.double() / act_scale.double(), w_int.double() * beta.double())
    torch.testing.assert_close(y_int.double(), y64, rtol=1e-6, atol=1e-12)
    # The layer's float32 fake-quant forward also rounds every product and partial sum of its K-term dot
    # products (relative 2^-24 each): agreement to 1e-5 of the output's size.
    y = layer(x)
    torch.testing.assert_close(y_int, y, rtol=0, atol=1e-5 * float(y.detach().abs().max()))
    layer.eval().inference_int = True
    torch.testing.assert_close(layer(x), y_int)


def test_integer_matmul_is_exact_at_extremes():
    # every activation +-127 (or -128 through clamp) and every weight +-1: the largest sums an int8 x ternary
    # product can make; the int32 result must equal the exact integer sum.
    K = 4099
    x_int = torch.full((2, K), 127, dtype=torch.int8)
    x_int[1] = -128
    w = torch.ones(3, K, dtype=torch.int8)
    w[1] = -1
    w[2, ::2] = 0
    from bytedeploy.models.bitlinear import int_matmul

    exact = [[int(a) * int(b) for b in w.long().sum(1).tolist()] for a in (127, -128)]
    assert int_matmul(x_int, w).tolist() == exact


# ----------------------------------------------------------------------------------------------- STE


@pytest.mark.parametrize("mode", MODES)
def test_straight_through_gradients_reach_latent_weights_and_input(mode):
    layer = make_layer(24, 10, mode)
    x = torch.randn(4, 24, requires_grad=True)
    y = layer(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    for g in (layer.weight.grad, x.grad, layer.norm.weight.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # STE: dL/dW is what an ordinary Linear fed with the quantized input would give, as if Q_w were the identity
    with torch.no_grad():
        x_int, scale = quantize_activations(layer.norm(x))
        expected = upstream.t() @ (x_int.float() / scale)
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_a_small_model_fits_one_batch(mode):
    torch.manual_seed(0)
    model = bitnet.Model(bitnet.Config(block_size=32, n_layer=1, n_head=2, n_embd=32, ffn_hidden=64, mode=mode))
    batch = {"idx": torch.randint(0, 256, (4, 32)), "targets": torch.randint(0, 256, (4, 32))}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss, n = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or float(loss.detach())
    assert n == 128 and float(loss.detach()) < first - 1.0  # nats; starts at ~ln 256 = 5.5


# ----------------------------------------------------------------------------------------------- replace_linears


def test_replace_linears_swaps_every_linear_and_keeps_weights():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16, bias=False)), nn.Linear(16, 4))
    originals = [m for m in seq.modules() if type(m) is nn.Linear]
    weights = [m.weight for m in originals]
    biases = [m.bias for m in originals]
    x = torch.randn(5, 8)
    assert replace_linears(seq, "b1.58") is seq
    bits = [m for m in seq.modules() if isinstance(m, BitLinear)]
    assert len(bits) == 3 and not any(type(m) is nn.Linear for m in seq.modules())
    assert all(b.weight is w and b.bias is bias for b, w, bias in zip(bits, weights, biases))
    assert [b.bias is None for b in bits] == [False, True, False]
    y = seq(x)
    y.sum().backward()
    assert y.shape == (5, 4) and all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)


def test_replace_linears_skips_embeddings_and_lm_head():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embedding = nn.Linear(4, 8)
            self.body = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 3)

    model = replace_linears(Tiny(), "b1")
    assert type(model.patch_embedding) is nn.Linear and type(model.lm_head) is nn.Linear
    assert isinstance(model.body, BitLinear) and model.body.mode == "b1"


# ----------------------------------------------------------------------------------------------- the model


def assert_close_up_to_requantization(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Two float32 computations of the same model (cached vs full, integer vs fake-quant) differ by summation-order
    rounding, and an activation that sits on a rounding boundary of its int8 grid can then land on the neighbouring
    level (one step = max|x| / 127 of its token) in a later layer. So: most logits agree to float rounding (the
    median difference < 1e-5 of the logit scale) and every logit within 1e-3 of the scale (a cache or packing bug
    moves logits by O(scale))."""
    scale = float(expected.abs().max())
    diff = (actual - expected).abs()
    assert float(diff.median()) < 1e-5 * scale, float(diff.median())
    assert float(diff.max()) < 1e-3 * scale, float(diff.max())


@pytest.mark.parametrize("mode", MODES)
def test_kv_cache_logits_equal_full_recompute(mode):
    model = make_model(mode)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        full = model.logits(idx)
        caches = model.make_caches(2, 16)
        steps = [model.logits(idx[:, :5], caches, 0)]
        steps += [model.logits(idx[:, t:t + 1], caches, t) for t in range(5, 16)]
    assert_close_up_to_requantization(torch.cat(steps, 1), full)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_eager_equals_reference_past_the_context(mode):
    model = make_model(mode, block_size=8)
    prompt, n_new = [1, 2, 3], 24  # 27 bytes: the window slides 19 times
    ref = bitnet.generate_reference(model, prompt, n_new, GREEDY, np.random.default_rng(0))
    eager = bitnet.generate_cached(model, prompt, n_new, GREEDY, batch_size=2)
    assert len(ref) == n_new and len(set(ref)) > 3
    assert eager.tolist() == [ref, ref]


def test_generate_returns_bytes_and_backends_agree():
    model = make_model()
    request = GenerateRequest(b"", 20, 2, GREEDY)  # empty prompt: starts from a newline byte
    ref = bitnet.generate(model, model.cfg, request, "eager-reference")
    eager = bitnet.generate(model, model.cfg, request, "eager")
    assert ref.outputs == eager.outputs and all(len(o) == 20 for o in ref.outputs)
    assert eager.n_new == 40 and eager.unit == "byte"
    assert ref.outputs[0] == bytes(bitnet.generate_reference(model, [10], 20, GREEDY, np.random.default_rng(0)))
    sampled = bitnet.generate(model, model.cfg, GenerateRequest(b"ab", 30, 3, SamplingConfig(seed=1)), "eager")
    assert [len(o) for o in sampled.outputs] == [30] * 3
    assert len(set(sampled.outputs)) == 3  # rows draw different bytes
    with pytest.raises(UserError):
        bitnet.generate(model, model.cfg, request, "tensorrt")


def test_integer_inference_matches_fake_quant_model():
    model = make_model()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        fake = model.logits(idx)
        integer = model.set_inference_int(True).logits(idx)
        model.train()  # training always uses fake quantization
        assert torch.equal(model.logits(idx), fake)
    assert_close_up_to_requantization(integer, fake)


def test_a_half_precision_model_runs_in_half_precision():
    """RMSNorm computes in float32; its output is cast back so the fp16 weights that follow accept it."""
    model = make_model()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        full = model.logits(idx)
        half = model.half().logits(idx)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float().argmax(-1) == full.argmax(-1)).float().mean() > 0.9  # a few ties may flip in fp16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_forward_equals_eager_logits(dtype):
    """runtimes.native_bitnet's forward (the fp route: weights quantized once) over a static cache gives the eager
    model's logits, in the model's dtype: RMSNorm's float32 output is cast back before the half-precision weights
    that follow (on an H100 a float16 native run failed there)."""
    from bytedeploy.runtimes.native_bitnet import Linears, forward

    model = make_model().to(dtype)
    idx = torch.randint(0, 256, (2, 16))
    T = model.cfg.block_size
    positions, causal = torch.arange(T), torch.ones(T, T, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = model.logits(idx)
        got = forward(model, Linears(model, "fp"), idx, positions[:16], causal[:16], model.make_caches(2, T))
    assert got.dtype == dtype
    if dtype == torch.float32:
        assert_close_up_to_requantization(got, expected)
    else:  # bfloat16 rounds the two computations' sums differently
        assert (got.float().argmax(-1) == expected.float().argmax(-1)).float().mean() > 0.9


def test_make_data_reads_a_folder_as_one_byte_stream(tmp_path):
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_bytes(bytes([65 + i]) * 40)
    cfg = bitnet.Config(block_size=16, n_layer=1, n_head=2, n_embd=16, ffn_hidden=32)
    data = bitnet.make_data(cfg, str(tmp_path), {"eval_split": 0.3})
    assert len(data.train) + len(data.evals) == 240 and data.unit == "byte"
    assert set(np.unique(np.concatenate([data.train, data.evals])).tolist()) == set(range(65, 71))
    batch = data.train_batch(np.random.default_rng(0), 4)
    assert batch["idx"].shape == (4, 16) and torch.equal(batch["idx"][:, 1:], batch["targets"][:, :-1])
    evals = tmp_path.parent / f"{tmp_path.name}-eval"
    evals.mkdir()
    (evals / "e.txt").write_bytes(b"z" * 30)
    data = bitnet.make_data(cfg, str(tmp_path), {"eval_data": str(evals)})
    assert len(data.train) == 240 and data.evals.tolist() == [ord("z")] * 30
    with pytest.raises(UserError):
        bitnet.make_data(cfg, str(tmp_path / "missing"), {})
    with pytest.raises(UserError):
        build_model_config(bitnet, "tiny", {"mode": "b2"})


def test_cli_train_lowers_loss_then_generates(tmp_path):
    out = tmp_path / "ckpt"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "bitnet", "--preset", "tiny", "--steps", "60", "--no-progress",
                                 "--context", "64", "--batch-size", "4", "--first-mb", "2", "--lr", "3e-3",
                                 "--warmup", "10", "--eval-every", "0", "--eval-batches", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    m = re.search(r"eval bits per byte: ([\d.]+) at step 0 -> ([\d.]+) at step 60", result.output)
    assert m, result.output
    before, after = float(m.group(1)), float(m.group(2))
    assert before > 7.0 and after < before - 2.0  # ~8 bits per byte at init
    outputs = []
    for backend in ("eager", "eager-reference"):
        gen = runner.invoke(cli, ["generate", str(out), "--max-new", "32", "--prompt", "def ", "--temperature", "0",
                                  "--backend", backend, "-o", str(tmp_path / f"{backend}.txt")])
        assert gen.exit_code == 0, gen.output
        outputs.append((tmp_path / f"{backend}.txt").read_bytes())
    assert len(outputs[0]) == 32 and outputs[0] == outputs[1]
    gen = runner.invoke(cli, ["generate", str(out), "--max-new", "32"])  # sampled, empty prompt
    assert gen.exit_code == 0 and "eager: 32 bytes" in gen.output, gen.output


@gpu_test()
@pytest.mark.parametrize("mode", MODES)
def test_cuda_integer_path_and_generation(mode):
    layer = make_layer(130, 72, mode).cuda()
    x = torch.randn(4, 130, device="cuda")
    packed, w_scale, _ = layer.export_int()
    y_int = bitlinear_int(layer.norm(x), packed, w_scale, 130)
    y_cpu = bitlinear_int(layer.norm(x).cpu(), packed.cpu(), w_scale.cpu(), 130)
    torch.testing.assert_close(y_int.cpu(), y_cpu, rtol=1e-6, atol=1e-12)  # float64 on CUDA is exact too
    model = make_model(mode).cuda()
    ref = bitnet.generate_reference(model, [1, 2, 3], 24, GREEDY, np.random.default_rng(0))
    assert bitnet.generate_cached(model, [1, 2, 3], 24, GREEDY).tolist() == [ref]
