"""BitLinear W2A8 kernels: bitwise equal to bitlinear_int on the GPU; on the CPU through Triton's interpreter when
Triton is installed; and a one-line error where they cannot run."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bytedeploy.errors import UserError
from bytedeploy.models.bitlinear import ACT_QMAX, EPS, bitlinear_int, pack_ternary
from bytedeploy.plugins import bitlinear_kernels as bk

gpu = pytest.mark.skipif(not torch.cuda.is_available() or bk.triton is None, reason="needs a CUDA GPU and Triton")


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
])
def test_kernel_bitwise_equal_to_integer_reference(lead, K, N, dtype):
    check_bitwise(*make_case(lead, K, N, dtype, "cuda"), K)


@gpu
@pytest.mark.parametrize("tokens", [1, 24])
def test_kernel_binary_weights_and_odd_k(tokens):
    check_bitwise(*make_case((tokens,), 97, 29, torch.float16, "cuda", binary=True, seed=3), 97)


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


INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from test_bitlinear_kernels import check_bitwise, make_case
    cases = [((1,), 100, 37, torch.float32), ((2,), 64, 20, torch.float16), ((4,), 4, 3, torch.float32),
             ((7,), 130, 50, torch.float16), ((20,), 256, 33, torch.float32)]
    for lead, K, N, dtype in cases:
        check_bitwise(*make_case(lead, K, N, dtype, "cpu"), K)
    check_bitwise(*make_case((6,), 97, 29, torch.float16, "cpu", binary=True), 97)
    print("interpreter ok")
""")


def triton_interpreter_usable() -> bool:
    if bk.triton is None:
        return False
    major, minor = (int(v) for v in bk.triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)  # older interpreters fail on numpy >= 2.4 (int() of 1-element arrays)


@pytest.mark.skipif(not triton_interpreter_usable(), reason="needs Triton >= 3.9 for its CPU interpreter")
def test_kernels_bitwise_in_triton_interpreter(tmp_path):
    """The same kernels on the CPU (TRITON_INTERPRET=1 must be set before Triton is imported: a subprocess).
    The interpreter takes the portable forms of rint and dp4a; both kernels, ties, b1 weights, padded K."""
    (tmp_path / "run.py").write_text(INTERPRETER_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "interpreter ok" in proc.stdout
