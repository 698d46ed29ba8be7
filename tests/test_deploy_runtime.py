"""The deploy runtime imports no torch: the numpy sampler against the torch one, the numpy BitLinear op bit for bit
against the integer reference, no deploy-path module importing torch (statically, through its module-level imports),
and every family's tiny bundle generating, in a process where torch cannot be imported, the full install's greedy
output; `bench` on a bundle there too."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bytedeploy.cli import cli
from bytedeploy.models import sampling as torch_sampling
from bytedeploy.models.bitlinear import bitlinear_int, pack_ternary, quantize_weights
from bytedeploy.plugins import ort_ops
from bytedeploy.runtimes import LOOPS
from bytedeploy.sampling import SamplingConfig, probabilities, sample

# What runs a bundle: the commands' modules, loading and checking bundles, the runners, the five loops and their
# families' facts, sampling, the BitLinear ONNX Runtime op, bench, and the deploy side's other commands (open a model,
# serve, doctor, pack).
DEPLOY_MODULES = [
    "bytedeploy.cli", "bytedeploy.deploy_cli", "bytedeploy.bench", "bytedeploy.sampling", "bytedeploy.generation",
    "bytedeploy.registry", "bytedeploy.exporters.bundle", "bytedeploy.runtimes", "bytedeploy.runtimes.ort",
    "bytedeploy.runtimes.trt", "bytedeploy.runtimes.windowed", "bytedeploy.plugins.ort_ops",
    *LOOPS.values(), *(f"bytedeploy.families.{m}" for m in ("bgpt", "bitnet", "sigma_gpt", "bfn", "char_gpt2")),
    "bytedeploy.runner", "bytedeploy.serve.app", "bytedeploy.serve.command", "bytedeploy.serve.metrics",
    "bytedeploy.serve.scheduler",
    "bytedeploy.runtimes.doctor", "bytedeploy.runtimes.pack", "bytedeploy.runtimes.targets",
]
# Greedy generate flags per tiny bundle (conftest.tiny_bundles), for the bundle and its checkpoint alike.
GENERATE = {
    "bgpt": ["--prompt", "import ", "--max-new", "30"],
    "bitnet": ["--prompt", "ab", "--max-new", "40"],
    "bitnet-plugin": ["--prompt", "ab", "--max-new", "40"],
    "sigma-gpt": ["--prompt", "def ", "--max-new", "12"],
    "sigma-gpt burst": ["--prompt", "def ", "--max-new", "12", "--backend", "burst", "--n-orders", "2"],
    "bfn": ["--prompt", "def f_1", "--max-new", "3", "--steps", "4"],
    "char-gpt2": ["--prompt", "def ", "--max-new", "40"],
}
NO_TORCH = "import sys; sys.modules['torch'] = None  # import torch fails, as without it\n"


def generate_args(name: str, path) -> list[str]:
    return ["generate", str(path), *GENERATE[name], "--temperature", "0"]


def eager_outputs(tiny_bundles) -> dict[str, str]:
    """The full install's greedy stdout of every GENERATE case, from the checkpoints (eager backends)."""
    out = {}
    for name in GENERATE:
        result = CliRunner().invoke(cli, generate_args(name, tiny_bundles[name.split()[0]][0]))
        assert result.exit_code == 0, result.output
        out[name] = result.stdout
    return out


def test_generate_cases_cover_every_bundle(tiny_bundles):
    assert {name.split()[0] for name in GENERATE} == set(tiny_bundles)


# ----------------------------------------------------------------------------------------------- sampling


SETTINGS = [SamplingConfig(temperature=0.0), SamplingConfig(top_k=1), SamplingConfig(temperature=0.7),
            SamplingConfig(top_k=5, temperature=1.3), SamplingConfig(top_p=0.8), SamplingConfig(top_k=8, top_p=0.5)]


@pytest.mark.parametrize("cfg", SETTINGS, ids=str)
def test_numpy_sampler_draws_from_the_torch_samplers_distribution(cfg):
    logits = np.random.default_rng(0).standard_normal((3, 4, 40)).astype(np.float32) * 2
    expected = torch_sampling.probabilities(torch.from_numpy(logits), cfg).numpy()
    np.testing.assert_allclose(probabilities(logits, cfg), expected, atol=1e-6)
    tokens = sample(logits, cfg, np.random.default_rng(1))
    assert tokens.shape == (3, 4) and tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, sample(logits, cfg, np.random.default_rng(1)))  # the same seed, the same
    if cfg.greedy:
        np.testing.assert_array_equal(tokens, logits.argmax(-1))
        np.testing.assert_array_equal(tokens, torch_sampling.sample(torch.from_numpy(logits), cfg).numpy())
    assert (np.take_along_axis(expected, tokens[..., None], -1) > 0).all()  # never a filtered-out token


def test_numpy_sampler_frequencies_fit_the_distribution():
    cfg = SamplingConfig(top_k=6, top_p=0.9, temperature=0.8)
    logits = np.random.default_rng(2).standard_normal(12).astype(np.float32)
    probs = probabilities(logits, cfg).astype(np.float64)
    n = 40_000
    counts = np.bincount(sample(np.broadcast_to(logits, (n, 12)), cfg, np.random.default_rng(3)), minlength=12)
    kept = probs > 0
    assert (counts[~kept] == 0).all() and 2 <= kept.sum() <= 6
    chi2 = float((((counts - n * probs) ** 2)[kept] / (n * probs[kept])).sum())
    assert chi2 < 30, chi2  # df <= 5: p < 1e-5 above 30


# ----------------------------------------------------------------------------------------------- BitLinear op


@pytest.mark.parametrize("in_features, out_features, tokens", [(13, 7, 1), (128, 352, 8), (352, 128, 80),
                                                                (1000, 3, 2)])
def test_numpy_bitlinear_equals_the_integer_reference_bit_for_bit(in_features, out_features, tokens):
    g = torch.Generator().manual_seed(in_features)
    w_int, beta = quantize_weights(torch.randn(out_features, in_features, generator=g))
    packed = pack_ternary(w_int)
    scales = torch.logspace(-4, 2, tokens)[:, None, None]  # per-token absmax from tiny to large
    x = torch.randn(tokens, 3, in_features, generator=g) * scales
    x[0, 0] = 0  # an all-zero token: the absmax clamp
    expected = bitlinear_int(x, packed, beta, in_features).numpy()
    for _ in range(2):  # the second call takes the unpacked weight from the cache
        got = ort_ops.bitlinear_op(x.numpy(), packed.numpy(), beta.numpy().reshape(1), in_features, out_features)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------------------------- no torch


def module_level_imports(name: str) -> set[str]:
    """Modules a module imports when it is imported (not inside functions): dotted names, `from a import b` as
    both a.b and a."""
    tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
    found, stack = set(), list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return found


def is_module(name: str) -> bool:
    """A module of the package (`from bytedeploy.errors import UserError` also names bytedeploy.errors.UserError)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_no_deploy_module_imports_torch_when_imported():
    """Follow every deploy-path module's module-level imports through the package: none reaches torch (or the
    torch side of the package: bytedeploy.models, checkpoint, training)."""
    torch_side = ("torch", "bytedeploy.models", "bytedeploy.checkpoint", "bytedeploy.training")
    chains = {name: [name] for name in DEPLOY_MODULES}
    todo = list(DEPLOY_MODULES)
    while todo:
        name = todo.pop()
        parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}  # imported before the module
        for imported in sorted(module_level_imports(name) | parents):
            chain = [*chains[name], imported]
            assert not imported.startswith(torch_side), " -> ".join(chain)
            if imported.startswith("bytedeploy") and imported not in chains and is_module(imported):
                chains[imported] = chain
                todo.append(imported)
    assert len(chains) > len(DEPLOY_MODULES)  # the walk followed imports beyond the list


def test_bundles_generate_eager_greedy_output_where_torch_cannot_be_imported(tiny_bundles, tmp_path):
    """One process without torch: imports every deploy-path module, generates on every family's bundle (ORT, and
    sigma-GPT's burst loop), benches one; it prints what the checkpoints' eager backends print."""
    cases = {name: generate_args(name, tiny_bundles[name.split()[0]][1]) for name in GENERATE}
    bench_json = tmp_path / "bench.json"
    cases["bench"] = ["bench", str(tiny_bundles["char-gpt2"][1]), "--batch-sizes", "1,2", "--max-new", "8",
                      "--repeats", "1", "--out", str(bench_json)]
    script = NO_TORCH + f"""
import importlib, json
from click.testing import CliRunner
from bytedeploy.cli import cli
for name in {DEPLOY_MODULES!r}:
    importlib.import_module(name)
results = {{name: (r.exit_code, r.stdout, r.output) for name, r in
           ((name, CliRunner().invoke(cli, args)) for name, args in json.loads({json.dumps(cases)!r}).items())}}
loaded = sorted(m for m in sys.modules if m.startswith(("torch.", "bytedeploy.models", "bytedeploy.checkpoint")))
print(json.dumps({{"results": results, "loaded": loaded}}))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["loaded"] == []
    results = report["results"]
    for name, expected in eager_outputs(tiny_bundles).items():
        code, stdout, output = results[name]
        assert code == 0, output
        assert stdout == expected, name
    assert results["bench"][0] == 0, results["bench"][2]
    rows = json.loads(bench_json.read_text())["rows"]
    assert [(r["backend"], r["batch_size"], r["status"]) for r in rows] == [("ort", 1, "ok"), ("ort", 2, "ok")]
    assert all(r["tokens_per_s"] > 0 and r["new"] == 8 * r["batch_size"] for r in rows)


def test_bench_on_a_bundle_refuses_checkpoint_options_in_one_line(tiny_bundles):
    bundle = tiny_bundles["char-gpt2"][1]
    for args, words in [(["--backends", "eager,ort"], "eager: checkpoint backends; a bundle runs on ort"),
                        (["--bundle", bundle], "--bundle goes with a checkpoint")]:
        result = CliRunner().invoke(cli, ["bench", str(bundle), *map(str, args)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {words}"), result.output


def test_bench_compares_bundle_backends_with_the_first_that_ran():
    from bytedeploy.bench import BenchConfig, add_derived

    result = {"family": "char-gpt2", "rows": [
        {"backend": b, "batch_size": 1, "status": "ok", "outputs_sha": [sha], "tokens_per_s": 10.0, "new": 8}
        for b, sha in (("ort", "a"), ("ort-cuda", "a"), ("trt", "b"))]}
    add_derived(result, None, BenchConfig(backends=["ort", "ort-cuda", "trt"]), bases=["ort"])
    assert [r.get("matches_ort") for r in result["rows"]] == [None, True, False]
    assert not any("speedup_vs_eager_reference" in r for r in result["rows"])
