"""The Bayesian-flow LM's update noise (bytedeploy.families.bfn): a counter-based N(0, 1) generator whose numpy
(bundle loop) and torch (eager, eager-reference, native) versions give the same bits on the CPU and on CUDA, a row's
noise independent of the other rows of its batch, and its distribution close to N(0, 1)."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gpu_marks import gpu_test
from onnx import TensorProto, helper, numpy_helper

from bytedeploy.families import bfn as facts
from bytedeploy.models import bfn

cuda = gpu_test()
L, K = 64, 2048  # bfn small's sequence and vocabulary: 131,072 draws per row and step


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def ks_distance(sorted_values: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the empirical distribution of sorted_values and N(0, 1)."""
    n = sorted_values.size
    cdf = normal_cdf(sorted_values)
    return max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())


def test_a_million_draws_are_standard_normal():
    keys = facts.noise_keys(seed=3, batch_size=4, n_steps=2)
    z = np.concatenate([facts.update_noise(keys[i], L, K).ravel() for i in range(2)]).astype(np.float64)
    n = z.size
    assert n > 1_000_000
    assert abs(z.mean()) < 4 / math.sqrt(n)  # 4 standard errors
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert ks_distance(np.sort(z)) < 1.95 / math.sqrt(n)  # below the 0.1% critical value
    assert np.abs(z).max() < 3.993  # the table's truncation


def test_the_tables_distribution_is_what_its_comment_says():
    """All 2^24 equally likely values A[bin] + f * S[bin]: KS distance to N(0, 1), moments and tails as documented
    in bytedeploy.families.bfn, and f * S exact in float32 (so no FMA can change a bit)."""
    start, slope = facts.normal_table()
    f = np.arange(facts.NOISE_BINS, dtype=np.float32)
    product = f[None] * slope[:, None]
    np.testing.assert_array_equal(product.astype(np.float64), f[None].astype(np.float64) * slope[:, None])
    values = np.sort((start[:, None] + product).ravel()).astype(np.float64)
    assert ks_distance(values) < 3.5e-5
    assert abs(values.mean()) < 1e-7 and abs(values.var() - 1) < 6e-5
    assert 3.99 < -values[0] < 3.993 and 3.99 < values[-1] < 3.993
    assert start[1] == pytest.approx(-3.487, abs=1e-3)  # the second bin starts at Phi^-1(1/4096)


def test_draws_are_uncorrelated_across_tokens_positions_steps_rows_and_seeds():
    keys = facts.noise_keys(seed=11, batch_size=2, n_steps=2)
    z = np.stack([facts.update_noise(keys[i], L, K) for i in range(2)]).astype(np.float64)  # (step, row, L, K)
    other_seed = facts.update_noise(facts.noise_keys(seed=12, batch_size=1, n_steps=1)[0], L, K)[0]
    high_seed = facts.update_noise(facts.noise_keys(seed=11 + 2**31, batch_size=1, n_steps=1)[0], L, K)[0]
    pairs = {"tokens": (z[..., :-1], z[..., 1:]), "positions": (z[..., :-1, :], z[..., 1:, :]),
             "steps": (z[0], z[1]), "rows": (z[:, 0], z[:, 1]), "squares of steps": (z[0] ** 2, z[1] ** 2),
             "seeds": (z[0, 0], other_seed), "seeds' high bits": (z[0, 0], high_seed)}
    for name, (a, b) in pairs.items():
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 5 / math.sqrt(a.size), (name, r)


@pytest.mark.parametrize("shape", [(L, K), (10, 24), (7, 3)])
def test_numpy_and_torch_cpu_give_the_same_bits(shape):
    for seed, batch_size in [(0, 1), (5, 3), (2**40 + 7, 2)]:
        keys = facts.noise_keys(seed, batch_size, n_steps=3)
        for step_keys in keys:
            expected = facts.update_noise(step_keys, *shape)
            got = bfn.update_noise(torch.from_numpy(step_keys), *shape).numpy()
            assert got.dtype == np.float32 and got.shape == (batch_size, *shape)
            np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


def test_a_rows_noise_depends_on_its_own_request_only():
    """The server batches requests row by row: a request's rows get the same noise alone or beside other requests'."""
    alone = facts.noise_keys(seed=9, batch_size=2, n_steps=4)
    batch = np.concatenate([facts.noise_keys(seed=1, batch_size=1, n_steps=4), alone,
                            facts.noise_keys(seed=9, batch_size=1, n_steps=4)], axis=1)
    np.testing.assert_array_equal(facts.noise_keys(seed=9, batch_size=5, n_steps=4)[:, :2], alone)
    for step in range(4):
        z = facts.update_noise(batch[step], 10, 24)
        np.testing.assert_array_equal(z[1:3], facts.update_noise(alone[step], 10, 24))
        np.testing.assert_array_equal(z[3], z[1])  # row 0 of the same seed
    z = facts.update_noise(batch[0], 10, 24)
    assert len({row.tobytes() for row in z[:3]}) == 3  # other seeds and rows differ
    assert not np.array_equal(facts.update_noise(alone[1], 10, 24), facts.update_noise(alone[0], 10, 24))  # steps


def test_integer_ops_never_wrap():
    """int64 results equal Python's unbounded integers at the largest inputs: no product reaches 2^63."""
    rng = np.random.default_rng(0)
    x = np.concatenate([[0, 1, facts.NOISE_MASK], rng.integers(0, facts.NOISE_MASK + 1, 1000)])
    assert facts.mix31(x).tolist() == [facts.mix31(int(v)) for v in x]
    index = np.array([0, 1, 2**31 - 1])
    for offset, multiplier in [(facts.NOISE_MASK, 2**32 - 1), (0, 1), (12345, 2**32 - 3)]:
        bins, fraction = facts.noise_bins(offset, multiplier, index)
        python = [facts.mix31((int(e) * multiplier + offset) & facts.NOISE_MASK) for e in index]
        assert bins.tolist() == [h >> 19 for h in python]
        assert fraction.tolist() == [(h >> 7) & 4095 for h in python]
    keys = facts.noise_keys(seed=2**62 - 1, batch_size=3, n_steps=2)
    assert keys.dtype == np.int64 and (keys >= 0).all() and (keys[..., 1] % 2 == 1).all()
    with pytest.raises(ValueError, match="too large"):
        facts.update_noise(keys[0], 2**16, 2**15)


def onnx_noise_graph(seq_len: int, vocab_size: int) -> onnx.ModelProto:
    """keys (B, 2) -> noise (B, L * K) from the ops the generator's comment names: int64 Mul, Add, Div by 2^s and
    Mod 2^s (which ONNX Runtime's CUDA execution provider implements), Cast, Gather, float Mul and Add."""
    start, slope = facts.normal_table()
    arrays = {"index": np.arange(seq_len * vocab_size), "start": start, "slope": slope, "split": np.array([1, 1]),
              "mask": np.array(1 << 31), "p15": np.array(1 << 15), "p19": np.array(1 << 19), "p7": np.array(1 << 7),
              "n_bins": np.array(facts.NOISE_BINS)}
    arrays.update({f"c{r}": np.array(c) for r, c in enumerate(facts.MIX_CONSTANTS)})
    nodes = [helper.make_node("Split", ["keys", "split"], ["offset", "multiplier"], axis=1)]

    def op(kind, inputs, output, **attrs):
        nodes.append(helper.make_node(kind, inputs, [output], **attrs))
        return output

    x = op("Mod", [op("Add", [op("Mul", ["index", "multiplier"], "x0"), "offset"], "x1"), "mask"], "x")
    for r in range(len(facts.MIX_CONSTANTS)):
        y = op("Add", [x, f"c{r}"], f"y{r}")
        x = op("Mod", [op("Div", [op("Mul", [y, y], f"y{r}^2"), "p15"], f"y{r}s"), "mask"], f"h{r}")
    bins = op("Div", [x, "p19"], "bins")
    fraction = op("Cast", [op("Mod", [op("Div", [x, "p7"], "f0"), "n_bins"], "f1")], "fraction", to=TensorProto.FLOAT)
    product = op("Mul", [fraction, op("Gather", ["slope", bins], "slopes")], "product")
    op("Add", [op("Gather", ["start", bins], "starts"), product], "noise")
    graph = helper.make_graph(nodes, "noise", [helper.make_tensor_value_info("keys", TensorProto.INT64, ["B", 2])],
                              [helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["B", seq_len * vocab_size])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    opsets = [helper.make_opsetid("", 18)]
    # the lowest IR version for the opset, as the exporters write: an older onnxruntime refuses the newest
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def test_the_same_ops_in_an_onnx_graph_give_the_same_bits():
    """What the exported step graph can compute on the device later (ONNX Runtime CUDA): no BitShift or Bitwise op."""
    model = onnx_noise_graph(10, 24)
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in model.graph.node} == {"Split", "Mul", "Add", "Div", "Mod", "Cast", "Gather"}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for step_keys in facts.noise_keys(seed=7, batch_size=3, n_steps=4):
        got = session.run(None, {"keys": step_keys})[0].reshape(3, 10, 24)
        np.testing.assert_array_equal(got.view(np.int32), facts.update_noise(step_keys, 10, 24).view(np.int32))


@cuda
def test_torch_cuda_and_a_captured_cuda_graph_give_numpys_bits():
    """Eager on CUDA computes the noise on the device; native computes it inside its CUDA graph, from a device table
    of keys indexed by a device step counter. Both equal the numpy noise bit for bit."""
    keys = facts.noise_keys(seed=4, batch_size=3, n_steps=5)
    expected = [facts.update_noise(step_keys, L, K) for step_keys in keys]
    device_keys = torch.from_numpy(keys).cuda()
    for step, step_keys in enumerate(device_keys):
        got = bfn.update_noise(step_keys, L, K).cpu().numpy()
        np.testing.assert_array_equal(got.view(np.int32), expected[step].view(np.int32))

    counter = torch.zeros(1, dtype=torch.long, device="cuda")
    out = torch.zeros((3, L, K), device="cuda")

    def step():
        out.copy_(bfn.update_noise(device_keys.index_select(0, counter)[0], L, K))
        counter.add_(1)

    step()  # warm-up outside the capture, as runtimes.native.capture does
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    counter.zero_()
    for step_expected in expected:
        graph.replay()
        np.testing.assert_array_equal(out.cpu().numpy().view(np.int32), step_expected.view(np.int32))
