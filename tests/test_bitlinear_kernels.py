"""BitLinear W2A8 kernels: bitwise equal to bitlinear_int on the GPU; on the CPU through Triton's interpreter when
Triton is installed; and a one-line error where they cannot run."""

import textwrap

import pytest
import torch
import triton_interpreter
from gpu_marks import gpu_test

from bytedeploy.errors import UserError
from bytedeploy.models.bitlinear import ACT_QMAX, EPS, bitlinear_int, pack_ternary
from bytedeploy.plugins import bitlinear_kernels as bk

gpu = gpu_test(bk.triton is None, "needs a CUDA GPU and Triton")


def tie_row(K: int) -> torch.Tensor:
    """A row whose scaled values x * s include exact .5 ties of both parities (round half to even matters)."""
    amax = torch.tensor(3.0)
    scale = ACT_QMAX / amax.clamp(min=EPS)  # the reference's own float32 arithmetic
    row = torch.zeros(K)
    row[0] = amax
    k = 1
    for n in range(-60, 60):
        if k >= K:
            break
        v = torch.tensor((n + 0.5) / scale.item(), dtype=torch.float32)
        if (v * scale).item() == n + 0.5:
            row[k] = v
            k += 1
    assert k > 20, "no exact ties found"
    return row


def make_case(lead: tuple, K: int, N: int, dtype, device, binary: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g) * 2
    flat = x.view(-1, K)
    flat[0] = tie_row(K) if K > 40 else flat[0]
    if flat.size(0) > 2:
        flat[1] = 0.0  # absmax 0: the 1e-5 clamp
    if binary:
        w_int = torch.randint(0, 2, (N, K), generator=g, dtype=torch.int8) * 2 - 1
    else:
        w_int = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    packed = pack_ternary(w_int)
    beta = torch.tensor([0.0173], dtype=torch.float32)
    return x.to(dtype).to(device), packed.to(device), beta.to(device)


def check_bitwise(x, packed, beta, K):
    y = bk.bitlinear_w2a8(x, packed, beta, K)
    ref = bitlinear_int(x, packed, beta, K).to(x.dtype)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.equal(y, ref), f"max |diff| {(y.float() - ref.float()).abs().max().item()}"


def check_bitwise_forced(kind, config, x, packed, beta, K):
    """check_bitwise with one kernel config forced instead of the autotuned / interpreter default one."""
    bk.FORCED_CONFIG[kind] = config
    try:
        check_bitwise(x, packed, beta, K)
    finally:
        bk.FORCED_CONFIG.pop(kind, None)


def check_split_k_counters_left_zero(device, config):
    """Two launches of the GEMM in a row on one scratch, as the autotuner and graph replays do: the partial sums
    start as garbage (they need no zeroing), the quantize kernel zeroes the tile counters; both launches are exact
    and leave every counter at zero (the last split of a tile resets it). M = 21: two BLOCK_M 16 tiles, the second
    partial; N = 40: a partial BLOCK_N tile; KB = 200: uneven splits for every config, some of them empty."""
    M, K, N = 21, 800, 40
    x, packed, beta = make_case((M,), K, N, torch.float16, device, seed=5)
    ref = bitlinear_int(x, packed, beta, K).to(x.dtype)
    KB = packed.size(1)
    x_q = torch.empty(M, 4, KB, dtype=torch.int8, device=device)
    scales = torch.empty(M, dtype=torch.float32, device=device)
    parts, counters = bk._split_k_scratch(M, N, device)
    parts.fill_(7)
    counters.fill_(7)
    ptx = not bk.interpreting()
    bk._quantize_rows_kernel[(M,)](x, x_q, scales, counters, counters.numel(), K, KB, x.stride(0), BLOCK_B=64,
                                   BLOCK_AMAX=1024, BLOCK_Z=64, PTX=ptx, PDL=False)  # KB > BLOCK_B: two passes
    assert not counters.any(), "the quantize kernel must zero the split-K tile counters"
    meta = dict(config) if isinstance(config, dict) else {**config.kwargs, "num_warps": config.num_warps,
                                                          "num_stages": config.num_stages}
    block_m = 16
    grid = (bk.triton.cdiv(M, block_m), bk.triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    for _ in range(2):
        y = torch.full((M, N), float("nan"), dtype=x.dtype, device=device)
        bk._gemm_kernel[grid](x_q, scales, packed, beta, y, parts, counters, M, N, KB, packed.stride(0),
                              y.stride(0), BLOCK_M=block_m, MAY_SPLIT=True, PTX=ptx, PDL=False, **meta)
        assert torch.equal(y, ref)
        assert not counters.any(), "split-K tile counters not left at zero"


# ----------------------------------------------------------------------------------------------- GPU


@gpu
@pytest.mark.parametrize("lead,K,N,dtype", [
    ((1,), 4096, 4096, torch.float16),  # decode GEMV, the benchmark shape
    ((1,), 4096, 4096, torch.float32),
    ((3,), 100, 37, torch.float16),  # K % 16 != 0: padded words, partial tiles
    ((2, 2), 256, 130, torch.float32),  # 4 tokens: still the GEMV, leading dims kept
    ((5,), 64, 48, torch.float16),  # smallest batch that takes the GEMM
    ((16,), 4096, 1024, torch.float16),
    ((64,), 1000, 300, torch.float32),  # K % 4 == 0 but K % 16 != 0, 64 tokens
    ((2, 33), 384, 1024, torch.float16),  # the small preset's FFN shape, BLOCK_M 64 with a partial tile
    ((64,), 4096, 4096, torch.float16),  # the benchmark's batch shapes
    ((17,), 4096, 4096, torch.bfloat16),  # BLOCK_M 32
    ((4,), 4096, 4096, torch.float16),  # the last GEMV batch
    ((5,), 4096, 4096, torch.float16),  # the first GEMM batch
])
def test_kernel_bitwise_equal_to_integer_reference(lead, K, N, dtype):
    check_bitwise(*make_case(lead, K, N, dtype, "cuda"), K)


@gpu
@pytest.mark.parametrize("tokens", [1, 24])
def test_kernel_binary_weights_and_odd_k(tokens):
    check_bitwise(*make_case((tokens,), 97, 29, torch.float16, "cuda", binary=True, seed=3), 97)


def config_id(config) -> str:
    return "-".join(f"{k}{v}" for k, v in config.kwargs.items()) + f"-w{config.num_warps}-s{config.num_stages}"


GEMV_CONFIGS = getattr(bk, "_GEMV_CONFIGS", [])
GEMM_CONFIGS = getattr(bk, "_GEMM_CONFIGS", [])


def gemv_config_fits(config, K: int) -> bool:
    """False for an X_TILE config on rows longer than its BLOCK_W words (the autotuner prunes it there)."""
    return bk._gemv_config_fits(config.kwargs, -(-K // 16))


GEMV_CASES = [
    ((1,), 4096, 4096, torch.float16),  # the benchmark shape
    ((4,), 4096, 1024, torch.bfloat16),  # the largest GEMV batch
    ((3,), 100, 37, torch.float32),  # K % 16 != 0 (padded words), a partial N block
    ((2,), 5000, 70, torch.float16),  # K % 16 != 0, 313 words: several BLOCK_W chunks, the last one partial
]


@gpu
@pytest.mark.parametrize("config,lead,K,N,dtype", [
    pytest.param(c, lead, K, N, dtype, id=f"{config_id(c)}-M{lead[0]}-K{K}-N{N}-{str(dtype)[6:]}")
    for c in GEMV_CONFIGS for lead, K, N, dtype in GEMV_CASES if gemv_config_fits(c, K)
])
def test_every_gemv_config_bitwise(config, lead, K, N, dtype):
    """Each autotune candidate, not only the one that wins on this GPU: a later GPU may pick another."""
    check_bitwise_forced("gemv", config, *make_case(lead, K, N, dtype, "cuda"), K)


@gpu
@pytest.mark.parametrize("config", GEMM_CONFIGS, ids=[config_id(c) for c in GEMM_CONFIGS])
@pytest.mark.parametrize("lead,K,N,dtype", [
    ((16,), 4096, 4096, torch.float16),  # the benchmark shapes
    ((64,), 4096, 4096, torch.float16),
    ((5,), 4096, 1000, torch.bfloat16),  # the smallest GEMM batch, partial N tile
    ((33,), 1000, 300, torch.float32),  # BLOCK_M 64 with a partial tile, K % 16 != 0, splits of uneven length
    ((17,), 97, 29, torch.float16),  # BLOCK_M 32, K = 97: every split but one empty or tiny
])
def test_every_gemm_config_bitwise(config, lead, K, N, dtype):
    check_bitwise_forced("gemm", config, *make_case(lead, K, N, dtype, "cuda"), K)


@gpu
@pytest.mark.parametrize("config", [c for c in GEMM_CONFIGS if c.kwargs["SPLIT_K"] > 1], ids=config_id)
def test_split_k_counters_left_zero_on_gpu(config):
    check_split_k_counters_left_zero("cuda", config)


@gpu
def test_autotuned_kernels_inside_a_cuda_graph():
    """As runtimes/native_bitnet.py uses them: a warm-up call (autotuning), then capture and replay."""
    cases = [make_case((m,), 1024, 512, torch.float16, "cuda", seed=m) for m in (1, 4, 5, 16, 64)]
    outs = [torch.empty(x.size(0), 512, dtype=x.dtype, device="cuda") for x, _, _ in cases]
    for (x, packed, beta), out in zip(cases, outs):
        bk.bitlinear_w2a8(x, packed, beta, 1024, out=out)  # warm-up: autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for (x, packed, beta), out in zip(cases, outs):
            bk.bitlinear_w2a8(x, packed, beta, 1024, out=out)
    for out in outs:
        out.fill_(float("nan"))
    for _ in range(2):  # twice: the split-K scratch must be usable again
        graph.replay()
        torch.cuda.synchronize()
        for (x, packed, beta), out in zip(cases, outs):
            assert torch.equal(out, bitlinear_int(x, packed, beta, 1024).half())


@gpu
@pytest.mark.parametrize("tokens,K,strided", [(1, 1024, False), (1, 1000, False), (64, 1024, False),
                                              (64, 1024, True)])
def test_chained_calls_inside_a_cuda_graph(tokens, K, strided):
    """Each call reads the previous call's output, as in a model: with PDL (sm_90+) the GEMV starts before the
    previous kernel ends, so x must be read only after its wait. K = 1000: the GEMV pads the weights (a copy each
    call) and launches without PDL; 64 tokens: the batch path, whose quantization kernel waits first thing and whose
    GEMM waits after its first weight loads; strided: packed weights with stride(1) != 1, which the batch path
    copies each call, so its GEMM launches without PDL."""
    layers = [make_case((tokens,), K, K, torch.float16, "cuda", seed=s)[1:] for s in range(4)]
    if strided:
        layers = [(packed.t().contiguous().t(), beta) for packed, beta in layers]
    x = make_case((tokens,), K, K, torch.float16, "cuda")[0]
    outs = [torch.empty_like(x) for _ in layers]

    def chain():
        h = x
        for (packed, beta), out in zip(layers, outs):
            h = bk.bitlinear_w2a8(h, packed, beta, K, out=out)

    chain()  # warm-up: autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    for out in outs:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    h = x
    for (packed, beta), out in zip(layers, outs):
        h = bitlinear_int(h, packed, beta, K).half()
        assert torch.equal(out, h)


@gpu
def test_kernel_out_argument_on_a_side_stream():
    x, packed, beta = make_case((2,), 512, 256, torch.float16, "cuda")
    out = torch.full((2, 256), float("nan"), dtype=torch.float16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        bk.bitlinear_w2a8(x, packed, beta, 512, out=out)
    stream.synchronize()
    assert torch.equal(out, bitlinear_int(x, packed, beta, 512).half())


@gpu
def test_kernel_rejects_bad_inputs_in_one_line():
    x, packed, beta = make_case((1,), 64, 8, torch.float16, "cuda")
    for args in [(x, packed[:, :-1], beta, 64), (x, packed, beta, 60), (x.int(), packed, beta, 64),
                 (x, packed, beta.expand(2), 64)]:
        with pytest.raises(UserError) as e:
            bk.bitlinear_w2a8(*args)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- CPU


@pytest.mark.skipif(torch.cuda.is_available() or bk.interpreting(), reason="checks the message on a machine "
                    "without a GPU")
def test_kernel_without_gpu_names_what_is_missing():
    with pytest.raises(UserError) as e:
        bk.bitlinear_w2a8(torch.zeros(1, 8), torch.zeros(4, 2, dtype=torch.uint8), torch.ones(1), 8)
    message = str(e.value)
    assert "\n" not in message
    assert ("Triton" in message) if bk.triton is None else ("CUDA GPU" in message)


@pytest.mark.skipif(bk.triton is None, reason="needs Triton")
def test_gemv_autotuner_prunes_x_tile_configs_for_rows_of_several_chunks():
    assert bk._gemv_tuned.early_config_prune is bk._prune_gemv_configs
    configs = bk._GEMV_CONFIGS
    assert any(c.kwargs["X_TILE"] for c in configs)
    assert bk._prune_gemv_configs(configs, {"KW": 256}) == configs  # K = 4096: one chunk of 256 words
    assert bk._prune_gemv_configs(configs, {"KW": 313}) == [c for c in configs if not c.kwargs["X_TILE"]]


INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from test_bitlinear_kernels import (check_bitwise, check_bitwise_forced, check_split_k_counters_left_zero,
                                        make_case)
    from bytedeploy.errors import UserError
    from bytedeploy.models.bitlinear import bitlinear_int
    from bytedeploy.plugins import bitlinear_kernels as bk

    # no bfloat16 here: the interpreter converts float32 -> bfloat16 by truncation, the GPU (and torch) round
    # to nearest even; the GPU tests cover bfloat16.
    # the defaults (fused GEMV, GEMM without split) over both regimes and their boundary (M = 4 | 5)
    cases = [((1,), 100, 37, torch.float32), ((2,), 64, 20, torch.float16), ((4,), 4, 3, torch.float32),
             ((7,), 130, 50, torch.float16), ((20,), 256, 33, torch.float32)]
    for lead, K, N, dtype in cases:
        check_bitwise(*make_case(lead, K, N, dtype, "cpu"), K)
    check_bitwise(*make_case((6,), 97, 29, torch.float16, "cpu", binary=True), 97)

    # GEMV: one and several chunks, K % 16 != 0, M = 1 and 4 (leading dims kept)
    for block_w in (4, 8):
        gemv = {"BLOCK_N": 8, "BLOCK_W": block_w, "X_TILE": False}
        for lead, K, N, dtype in [((1,), 100, 37, torch.float32), ((2, 2), 128, 20, torch.float16),
                                  ((1,), 97, 9, torch.float16), ((3,), 4, 3, torch.float32)]:
            check_bitwise_forced("gemv", gemv, *make_case(lead, K, N, dtype, "cpu"), K)

    # GEMV with X_TILE (x read as one tile, packed in registers): rows of BLOCK_W words or fewer, K % 16 != 0
    # (padded words), M = 1..4; row 0 has ties, row 1 is zero from M = 3, the last row has one large outlier
    for block_w, Ks in [(4, (64, 60, 48, 4)), (8, (128, 100, 97))]:
        gemv = {"BLOCK_N": 8, "BLOCK_W": block_w, "X_TILE": True}
        for K in Ks:
            for M in (1, 2, 3, 4):
                for dtype in (torch.float32, torch.float16):
                    x, packed, beta = make_case((M,), K, 12, dtype, "cpu", seed=K + M)
                    if M > 1:
                        x[-1, K // 3] = -300.0
                    check_bitwise_forced("gemv", gemv, x, packed, beta, K)
    x, packed, beta = make_case((1,), 80, 8, torch.float32, "cpu")  # 5 words > BLOCK_W: refused, not wrong
    try:
        check_bitwise_forced("gemv", {"BLOCK_N": 8, "BLOCK_W": 4, "X_TILE": True}, x, packed, beta, 80)
        raise AssertionError("X_TILE with rows longer than BLOCK_W must be refused")
    except UserError as e:
        assert "X_TILE" in str(e)

    # every GEMV autotune config at its real block sizes: one chunk (4096, 4000: padded words) and, without
    # X_TILE (pruned there), two chunks (5000)
    for config in bk._GEMV_CONFIGS:
        for K in (4096, 4000, 5000):
            if bk._gemv_config_fits(config.kwargs, -(-K // 16)):
                check_bitwise_forced("gemv", config, *make_case((2,), K, 40, torch.float16, "cpu"), K)

    # GEMM: split-K 1..4 (3: uneven splits, some empty), BLOCK_M 16 / 32 / 64 (M = 5, 17, 33), K % 16 != 0;
    # split-K through its plain-store reduction, twice in a row on one scratch, up to MAX_SPLIT_K splits
    for split_k in (1, 2, 3, 4):
        gemm = {"BLOCK_N": 16, "BLOCK_B": 16, "SPLIT_K": split_k}
        for lead, K, N, dtype in [((5,), 130, 50, torch.float16), ((17,), 100, 33, torch.float32),
                                  ((33,), 64, 17, torch.float16)]:
            check_bitwise_forced("gemm", gemm, *make_case(lead, K, N, dtype, "cpu", seed=split_k), K)
    for split_k in (2, 3, bk.MAX_SPLIT_K):
        check_split_k_counters_left_zero("cpu", {"BLOCK_N": 16, "BLOCK_B": 16, "SPLIT_K": split_k})
    x, packed, beta = make_case((8,), 64, 16, torch.float16, "cpu")  # more splits than the scratch holds: refused
    try:
        check_bitwise_forced("gemm", {"BLOCK_N": 16, "BLOCK_B": 16, "SPLIT_K": 2 * bk.MAX_SPLIT_K}, x, packed, beta,
                             64)
        raise AssertionError("SPLIT_K > MAX_SPLIT_K must be refused")
    except UserError as e:
        assert "SPLIT_K" in str(e)
    lead = (bk.SPLIT_K_MAX_TOKENS + 1,)  # above it no split-K (no scratch for it): refused, and unsplit is exact
    x, packed, beta = make_case(lead, 64, 16, torch.float16, "cpu")
    try:
        check_bitwise_forced("gemm", {"BLOCK_N": 16, "BLOCK_B": 16, "SPLIT_K": 2}, x, packed, beta, 64)
        raise AssertionError("split-K above SPLIT_K_MAX_TOKENS must be refused")
    except UserError as e:
        assert "splits" in str(e)
    check_bitwise_forced("gemm", {"BLOCK_N": 16, "BLOCK_B": 16, "SPLIT_K": 1}, x, packed, beta, 64)

    # out= in both regimes (and a leading shape)
    for lead in [(1, 3), (2, 4)]:
        x, packed, beta = make_case(lead, 96, 24, torch.float16, "cpu")
        out = torch.full((*lead, 24), float("nan"), dtype=torch.float16)
        assert bk.bitlinear_w2a8(x, packed, beta, 96, out=out) is out
        assert torch.equal(out, bitlinear_int(x, packed, beta, 96).half())
    print("interpreter ok")
""")



@pytest.mark.skipif(not triton_interpreter.usable(), reason="needs Triton >= 3.9 for its CPU interpreter")
def test_kernels_bitwise_in_triton_interpreter(tmp_path):
    """The same kernels on the CPU (TRITON_INTERPRET=1 must be set before Triton is imported: a subprocess).
    The interpreter takes the portable forms of rint, dp4a, prmt and the packed plane decode (and runs without
    PDL); every code path: GEMV with and without X_TILE, GEMM with and without split-K, regime boundaries, ties,
    b1 weights, padded K, out=."""
    triton_interpreter.run_script(INTERPRETER_SCRIPT, tmp_path)
