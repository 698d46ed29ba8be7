"""Fused GPT-2 decode kernels (plugins/decode_kernels.py) against the torch path of runtimes.native.gpt2_step.

The same check runs on the GPU (float32 to rounding, float16 / bfloat16 to their precision) and on the CPU through
Triton's interpreter (a subprocess: TRITON_INTERPRET=1 must be set before Triton is imported). Step by step over a
static cache: hidden states, and the keys and values the kernels wrote, equal the torch path's; the last step also
equals the full causal forward pass of the stack."""

import textwrap

import pytest
import torch
import triton_interpreter
from gpu_marks import gpu_test

from bytedeploy.models import bgpt
from bytedeploy.models.layers import GPT2Stack, GPT2StackConfig
from bytedeploy.plugins import decode_kernels
from bytedeploy.plugins.patch_decode import SPECIAL, PatchDecoder
from bytedeploy.runtimes import native
from bytedeploy.sampling import SamplingConfig

cuda = gpu_test()


def decode(stack, embeds, kernels: str, n_slots: int):
    """Feed embeds (B, T, C) one position per gpt2_step -> (hidden (B, T, C), caches)."""
    saved = native.KERNELS
    native.KERNELS = kernels
    try:
        caches = stack.make_caches(embeds.size(0), n_slots)
        positions = torch.arange(n_slots, device=embeds.device)
        hidden = []
        for i in range(embeds.size(1)):
            slot = torch.tensor([i], device=embeds.device)
            x = embeds[:, i:i + 1]
            assert native.fused_blocks(x + 0) == (kernels == "auto")
            hidden.append(native.gpt2_step(stack, x, caches, slot, native.step_mask(positions, slot)))
        return torch.cat(hidden, 1), caches
    finally:
        native.KERNELS = saved


def check_fused_equals_torch(device, dtype, n_embd=40, n_head=4, n_layer=2, steps=9, batch_sizes=(1, 3),
                             atol=2e-6):
    torch.manual_seed(0)
    for gelu, bias in [("tanh", True), ("none", False)]:
        cfg = GPT2StackConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=steps + 3, bias=bias,
                              mlp_bias=bias, gelu=gelu)
        stack = GPT2Stack(cfg).eval()
        with torch.no_grad():
            for p in stack.parameters():
                p.normal_(0.0, 0.3)
        stack = stack.to(device=device, dtype=dtype)
        for B in batch_sizes:
            embeds = torch.randn(B, steps, n_embd, device=device, dtype=dtype)
            with torch.no_grad():
                fused, fused_caches = decode(stack, embeds, "auto", steps + 3)
                ref, ref_caches = decode(stack, embeds, "torch", steps + 3)
                full = stack(embeds)
            tol = dict(atol=atol, rtol=0) if dtype == torch.float32 else dict(atol=atol, rtol=atol)
            torch.testing.assert_close(fused, ref, **tol)
            torch.testing.assert_close(fused, full, **tol)
            for a, b in zip(fused_caches, ref_caches):
                torch.testing.assert_close(a.k, b.k, **tol)
                torch.testing.assert_close(a.v, b.v, **tol)


def check_attention_equals_qkv_attention(device, dtype=torch.float32, n_embd=32, n_head=4, batch_size=2, n_slots=7,
                                         atol=2e-5):
    """attention() on q, k, v computed beforehand (what a byte step's selection hands the next step's first block,
    decode_kernels.NextStep) attends as qkv_attention does over the same cache, slot after slot, and stores the
    same keys and values."""
    torch.manual_seed(1)
    stack = GPT2Stack(GPT2StackConfig(n_layer=1, n_head=n_head, n_embd=n_embd, n_positions=n_slots)).eval()
    stack = stack.to(device=device, dtype=dtype)
    block = stack.h[0]
    caches = [stack.make_caches(batch_size, n_slots)[0] for _ in range(2)]
    positions = torch.arange(n_slots, device=device)
    with torch.no_grad():
        for i in range(n_slots):
            x, slot = torch.randn(batch_size, n_embd, device=device, dtype=dtype), torch.tensor([i], device=device)
            ref = decode_kernels.qkv_attention(x, block.ln_1, block.attn.c_attn, caches[0], slot,
                                               native.step_mask(positions, slot), n_head)
            got = decode_kernels.attention(block.attn.c_attn(block.ln_1(x)), caches[1], slot, n_head)
            torch.testing.assert_close(got, ref, atol=atol, rtol=1e-5)
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=atol, rtol=1e-5)
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=atol, rtol=1e-5)


def fused_and_torch_patches(model, sampling, feature, forced) -> dict:
    """PatchDecoder's patches on the fused path ("auto") and the torch path, for a partial, a full and no forced
    prefix, and with counts per row (forced_per_row: the full prefix in row 0, none in row 1); asserts that they are
    equal, and so are the byte decoder's caches after the no-prefix patch (on the fused path the first block's keys
    and values after step 0 come from the selection's NextStep)."""
    patches, caches = {}, {}
    saved = native.KERNELS
    try:
        for kernels in ("auto", "torch"):
            native.KERNELS = kernels
            decoder = PatchDecoder(model, feature.size(0), sampling, use_graph=False)
            assert decoder.fused == (kernels == "auto")
            decoder.generator.manual_seed(3)
            with torch.no_grad():
                patches[kernels] = [decoder(feature, forced[:, :1]), decoder(feature, forced), decoder(feature)]
            caches[kernels] = decoder.caches
            per_row = PatchDecoder(model, feature.size(0), sampling, use_graph=False, forced_per_row=True)
            per_row.generator.manual_seed(3)
            counts = torch.tensor([forced.size(1)] + [0] * (feature.size(0) - 1), device=feature.device)
            with torch.no_grad():
                patches[kernels].append(per_row(feature, forced, n_forced=counts))
    finally:
        native.KERNELS = saved
    for a, b in zip(patches["auto"], patches["torch"]):
        assert torch.equal(a, b), (a, b)
    for a, b in zip(caches["auto"], caches["torch"]):  # loose: these test weights are large (std 0.5) and the
        # two paths' float32 roundings grow through the blocks; a wrong slot or value would be off by far more
        torch.testing.assert_close(a.k, b.k, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(a.v, b.v, atol=1e-3, rtol=1e-3)
    return patches


def check_patch_decode_fused_equals_torch(device, n_embd=16, n_head=2, n_layer=1, patch_size=3):
    """PatchDecoder's fused path (blocks, LN + head, select_byte) makes the torch path's patches: greedy and seeded
    sampling, with forced bytes, and with the end mark made to win so that a row emits it and keeps emitting it."""
    cfg = bgpt.Config(patch_size=patch_size, n_patches=4, n_embd=n_embd, n_layer=1, n_head=n_head,
                      byte_n_layer=n_layer, byte_n_head=n_head)
    torch.manual_seed(0)
    model = bgpt.Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model = model.to(device)
    feature = torch.randn(2, n_embd, device=device)
    forced = torch.tensor([[65, 10], [66, 11]], device=device)
    greedy, sampled = SamplingConfig(temperature=0.0), SamplingConfig(top_k=5, temperature=0.9, seed=3)
    patches = fused_and_torch_patches(model, greedy, feature, forced)["auto"]
    first_byte = int(patches[2][0, 0])
    # greedy rows do not depend on each other: counts per row give row 0 the full prefix's patch, row 1 the free one
    assert torch.equal(patches[3][0], patches[1][0]) and torch.equal(patches[3][1], patches[2][1])
    assert not torch.equal(patches[3][1], patches[1][1])
    fused_and_torch_patches(model, sampled, feature, forced)
    with torch.no_grad():  # the end mark's row: 10x the row of row 0's first free greedy byte, which it now beats
        model.byte_wte.weight[SPECIAL] = 10 * model.byte_wte.weight[first_byte]
    assert (fused_and_torch_patches(model, greedy, feature, forced)["auto"][2][0] == SPECIAL).all()
    fused_and_torch_patches(model, sampled, feature, forced)


def check_patch_edges_equal_the_whole_patch(device, n_embd=16, n_head=2, patch_size=4):
    """PatchDecoder.decode(n_steps) (a run's last patch, of which fewer bytes were asked for), fused and torch path,
    greedy and seeded sampling: the full patch's first n_steps bytes, then SPECIAL. decode(n_prefilled=k) (a run's
    first patch, whose k forced bytes go through in one pass): the step-by-step patch and cache."""
    cfg = bgpt.Config(patch_size=patch_size, n_patches=4, n_embd=n_embd, n_layer=1, n_head=n_head, byte_n_layer=1,
                      byte_n_head=n_head)
    torch.manual_seed(1)
    model = bgpt.Model(cfg).eval().to(device)
    with torch.no_grad():
        model.byte_wte.weight[SPECIAL] *= 0.1  # the end mark does not win: every byte of the prefix is drawn
    feature = torch.randn(3, n_embd, device=device)
    saved = native.KERNELS
    try:
        for kernels in ("auto", "torch"):
            native.KERNELS = kernels
            for sampling in (SamplingConfig(temperature=0.0), SamplingConfig(top_k=5, temperature=0.9, seed=3)):
                decoder = PatchDecoder(model, 3, sampling, use_graph=False)
                assert decoder.fused == (kernels == "auto")
                decoder.feature.copy_(feature)
                patches = {}
                for n_steps in (patch_size, 1, patch_size - 1):
                    decoder.generator.manual_seed(3)
                    with torch.no_grad():
                        decoder.decode(n_steps)
                    patches[n_steps] = decoder.patch.clone()
                full = patches[patch_size]
                assert (full != SPECIAL).all()
                for n_steps in (1, patch_size - 1):
                    assert torch.equal(patches[n_steps][:, :n_steps], full[:, :n_steps]), (kernels, n_steps)
                    assert (patches[n_steps][:, n_steps:] == SPECIAL).all()
            # forced bytes prefilled with the feature in one pass: greedy, the patch and the byte decoder's cache
            # of the step-by-step decode (a seeded draw differs: step by step draws at the forced steps too)
            decoder = PatchDecoder(model, 3, SamplingConfig(temperature=0.0), use_graph=False)
            decoder.feature.copy_(feature)
            for k in (1, patch_size - 1):
                decoder.forced[:, :k] = torch.arange(k, device=device) + 65
                decoder.n_forced.fill_(k)
                results = {}
                for n_prefilled in (0, k):
                    with torch.no_grad():
                        decoder.decode(n_prefilled=n_prefilled)
                    results[n_prefilled] = [decoder.patch.clone()] + [t.clone() for c in decoder.caches
                                                                      for t in (c.k, c.v)]
                stepwise, prefilled = results[0], results[k]
                assert torch.equal(prefilled[0], stepwise[0]), (kernels, k, prefilled[0], stepwise[0])
                assert (prefilled[0][:, :k] == decoder.forced[:, :k]).all()
                for a, b in zip(prefilled[1:], stepwise[1:]):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    finally:
        native.KERNELS = saved


def check_first_qkv_follows_weights(device, n_embd=16, n_head=2, patch_size=4):
    """A fused PatchDecoder whose first byte-decoder block's weights change in place remakes its QKV table: its
    patches and the first block's cached keys and values then equal a new torch-path decoder's."""
    cfg = bgpt.Config(patch_size=patch_size, n_patches=4, n_embd=n_embd, n_layer=1, n_head=n_head, byte_n_layer=1,
                      byte_n_head=n_head)
    torch.manual_seed(2)
    model = bgpt.Model(cfg).eval().to(device)
    feature = torch.randn(2, n_embd, device=device)
    greedy = SamplingConfig(temperature=0.0)
    decoder = PatchDecoder(model, 2, greedy, use_graph=False)
    assert decoder.fused
    with torch.no_grad():
        before = decoder(feature)
        for p in (model.byte_wte.weight, model.byte_decoder.h[0].attn.c_attn.weight):
            p.normal_(0.0, 0.5)
        after = decoder(feature)
    saved = native.KERNELS
    native.KERNELS = "torch"
    try:
        with torch.no_grad():
            reference = PatchDecoder(model, 2, greedy, use_graph=False)
            expected = reference(feature)
    finally:
        native.KERNELS = saved
    assert torch.equal(after, expected), (after, expected)
    assert not torch.equal(before, after)
    torch.testing.assert_close(decoder.caches[0].k, reference.caches[0].k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoder.caches[0].v, reference.caches[0].v, atol=1e-5, rtol=1e-5)


def check_patch_glue_equals_torch(device, dtype=torch.float32, n_embd=24, n_head=2, patch_size=3, n_patches=5):
    """embed_patch and patch_feature (bGPT's glue between the decoders) against the torch code they replace, with a
    row that ends in this patch, one done before it, one still going; and blocks_step without a key mask equal to
    blocks_step with the causal step mask."""
    cfg = bgpt.Config(patch_size=patch_size, n_patches=n_patches, n_embd=n_embd, n_layer=1, n_head=n_head,
                      byte_n_layer=1, byte_n_head=n_head)
    torch.manual_seed(0)
    model = bgpt.Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model = model.to(device=device, dtype=dtype)
    B, N, P, C = 3, n_patches, patch_size, n_embd
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # bf16: an ulp or two
    patch = torch.randint(0, SPECIAL, (B, P), device=device)
    patch[0, -1] = SPECIAL  # row 0 ends in this patch, row 2 was done before it, row 1 goes on
    done = torch.tensor([False, False, True], device=device)
    out = torch.full((B, N, P), SPECIAL, dtype=torch.long, device=device)
    all_done = torch.zeros((), dtype=torch.bool, device=device)
    for index_value, pos_value in [(1, 2), (7, 9)]:  # the second past the context: both clamped to N - 1
        index = torch.tensor([index_value], device=device)
        pos = torch.tensor([pos_value], device=device)
        slot = torch.zeros(1, dtype=torch.long, device=device)
        x = torch.zeros(B, C, dtype=dtype, device=device)
        d = done.clone()
        with torch.no_grad():
            decode_kernels.embed_patch(patch, d, out, all_done, index, pos, slot, model.patch_embedding,
                                       model.patch_decoder.wpe.weight, x, SPECIAL)
            ref_x = model.embed_patches(patch[:, None])[:, 0] + model.patch_decoder.wpe.weight[min(pos_value, N - 1)]
        torch.testing.assert_close(x, ref_x, **tol)
        assert int(slot) == min(pos_value, N - 1)
        assert torch.equal(out[:, min(index_value, N - 1)], patch.masked_fill(done[:, None], SPECIAL))
        assert d.tolist() == [True, False, True] and not bool(all_done)
    d = torch.tensor([False, True, True], device=device)
    with torch.no_grad():
        decode_kernels.embed_patch(patch, d, out, all_done, index, pos, slot, model.patch_embedding,
                                   model.patch_decoder.wpe.weight, x, SPECIAL)
    assert bool(all_done)

    h = torch.randn(B, C, dtype=dtype, device=device)
    feature, x0 = torch.zeros(B, C, dtype=dtype, device=device), torch.zeros(B, C, dtype=dtype, device=device)
    seen = torch.ones(B, dtype=torch.bool, device=device)
    pos, index = torch.tensor([3], device=device), torch.tensor([1], device=device)
    with torch.no_grad():
        decode_kernels.patch_feature(h, model.patch_decoder.ln_f, feature, model.byte_decoder.wpe.weight, x0, seen,
                                     pos, index)
        ref_feature = model.patch_decoder.ln_f(h)
        torch.testing.assert_close(feature, ref_feature, **tol)
        torch.testing.assert_close(x0, feature + model.byte_decoder.wpe.weight[0], atol=0, rtol=0)
    assert not seen.any() and int(pos) == 4 and int(index) == 2

    stack, caches = model.patch_decoder, [model.patch_decoder.make_caches(B, N) for _ in range(2)]
    positions = torch.arange(N, device=device)
    with torch.no_grad():
        for i in range(3):
            embeds, slot = torch.randn(B, C, dtype=dtype, device=device), torch.tensor([i], device=device)
            masked = decode_kernels.blocks_step(stack, embeds, caches[0], slot, native.step_mask(positions, slot))
            unmasked = decode_kernels.blocks_step(stack, embeds, caches[1], slot, None)
            torch.testing.assert_close(unmasked, masked, atol=0, rtol=0)


@cuda
def test_patch_glue_kernels_equal_torch_on_gpu():
    check_patch_glue_equals_torch("cuda")
    check_patch_glue_equals_torch("cuda", torch.bfloat16, n_embd=64, n_head=4, patch_size=16, n_patches=8)


@cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_attention_equals_qkv_attention_on_gpu(dtype, atol):
    for n_slots in (16, 23):  # a byte decoder's cache, and one longer than MAX_BLOCK_L: the loop's two blocks
        check_attention_equals_qkv_attention("cuda", dtype, n_embd=768, n_head=12, n_slots=n_slots, atol=atol)


@cuda
def test_patch_edges_equal_the_whole_patch_on_gpu():
    check_patch_edges_equal_the_whole_patch("cuda")


@cuda
def test_first_qkv_follows_weights_on_gpu():
    check_first_qkv_follows_weights("cuda")


@cuda
def test_patch_decode_fused_equals_torch_path_on_gpu():
    check_patch_decode_fused_equals_torch("cuda", n_embd=64, n_head=4, n_layer=2, patch_size=8)


@cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_fused_blocks_equal_torch_path_on_gpu(dtype, atol):
    check_fused_equals_torch("cuda", dtype, n_embd=256, n_head=4, steps=20, batch_sizes=(1, 3, 4), atol=atol)
    # a head size of 24: the fused QKV + attention kernel's tiles must divide it (BLOCK_N 1, 2, 4 or 8)
    check_fused_equals_torch("cuda", dtype, n_embd=96, n_head=4, steps=6, batch_sizes=(2,), atol=atol)


@cuda
def test_more_rows_than_the_kernels_take_keep_the_torch_path():
    x = torch.zeros(decode_kernels.MAX_ROWS + 1, 1, 8, device="cuda")
    assert not native.fused_blocks(x)
    assert native.fused_blocks(x[:1])
    assert not native.fused_blocks(torch.zeros(1, 2, 8, device="cuda"))  # prefill: T > 1


@cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 5e-5), (torch.bfloat16, 1e-1)])
def test_pinned_configs_equal_torch_path_on_gpu(dtype, atol):
    """bGPT base's shapes (768 wide, 12 heads), where this GPU has pinned configs for the dtype: a
    byte-decoder-long cache (16 positions) and a longer one, and (float32) the byte head."""
    if decode_kernels.pinned_config("ln_linear", (768, 768, False, True, 0), dtype, torch.device("cuda")) is None:
        pytest.skip(f"no {dtype} configs pinned for this GPU")
    for steps in (13, 20):  # caches of 16 and 23 positions: BLOCK_L 16 and 32
        check_fused_equals_torch("cuda", dtype, n_embd=768, n_head=12, n_layer=1, steps=steps,
                                 batch_sizes=(1,), atol=atol)
    if dtype == torch.float32:  # the patch decode's test compares patches: greedy ties need float32
        check_patch_decode_fused_equals_torch("cuda", n_embd=768, n_head=12, n_layer=1, patch_size=8)


def test_pinned_configs_are_tiles_the_kernels_take():
    """Every pinned config is one of the autotuner's candidates that its prune keeps: the weight tile within ~64
    registers per thread, BLOCK_N dividing the head size, the attention tile within MAX_BLOCK_L."""
    def pow2(n):
        return 1 << (n - 1).bit_length()

    assert decode_kernels.pinned_config("ln_linear", (768, 768, False, True, 0), torch.float32,
                                        torch.device("cpu")) is None
    for table in decode_kernels.PINNED_CONFIGS.values():
        for (kernel, key, dtype), (block_n, num_warps) in table.items():
            assert block_n in (1, 2, 4, 8, 16) and num_warps in (4, 8), (kernel, key)
            assert kernel in ("ln_linear", "qkv_attention", "head_select") and dtype.is_floating_point
            K = key[1]  # the input width in each kernel's key: (N, K, ..), (C, K, D, BLOCK_L), (V, C, LAST)
            assert block_n * pow2(K) <= 64 * 32 * num_warps, (kernel, key)
            if kernel == "qkv_attention":
                C, _, D, block_l = key
                assert D % block_n == 0 and C % D == 0 and block_l <= decode_kernels.MAX_BLOCK_L, key


def test_without_triton_or_gpu_the_torch_path_runs():
    if not decode_kernels.interpreting() and not torch.cuda.is_available():
        assert not native.fused_blocks(torch.zeros(1, 1, 8))


INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from test_decode_kernels import (check_attention_equals_qkv_attention, check_first_qkv_follows_weights,
                                     check_fused_equals_torch, check_patch_edges_equal_the_whole_patch,
                                     check_patch_decode_fused_equals_torch, check_patch_glue_equals_torch)
    check_fused_equals_torch("cpu", torch.float32, n_embd=24, n_head=2, n_layer=1, steps=5, batch_sizes=(2,))
    check_attention_equals_qkv_attention("cpu")
    check_first_qkv_follows_weights("cpu")
    check_patch_edges_equal_the_whole_patch("cpu")
    check_patch_decode_fused_equals_torch("cpu")
    check_patch_glue_equals_torch("cpu")
    print("interpreter ok")
""")


@pytest.mark.skipif(not triton_interpreter.usable(), reason="needs Triton >= 3.9 for its CPU interpreter")
def test_fused_blocks_in_triton_interpreter(tmp_path):
    triton_interpreter.run_script(INTERPRETER_SCRIPT, tmp_path)
