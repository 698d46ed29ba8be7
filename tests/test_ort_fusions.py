"""ONNX Runtime's contrib-op fusions (exporters/ort_fusions.py) on the tiny bundles, on the CPU: each fused graph holds
the fused ops we claim, keeps the standard graph's inputs and outputs, is what the ORT runner runs, and generates
eager's greedy output; the standard graphs (TensorRT's) keep standard ops only."""

from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner
from test_deploy_runtime import generate_args

from bytedeploy.cli import cli
from bytedeploy.exporters import export
from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.exporters.ort_fusions import MS_DOMAIN, contrib_op_counts
from bytedeploy.runtimes import make_runner

# family -> (its per-step graph, the layer count's config key); attention is fused where the query comes straight
# from the QKV projection (BFN rotates q and k first: no MultiHeadAttention there)
STEP_GRAPHS = {"char-gpt2": ("decode", "n_layer"), "sigma-gpt": ("decode", "n_layer"),
               "bgpt": ("patch_decode", "n_layer"), "bfn": ("step_greedy", "n_layer")}
FUSED_ATTENTION = {"char-gpt2", "sigma-gpt", "bgpt"}


@pytest.fixture(scope="module")
def fused_bundles(tiny_bundles, tmp_path_factory):
    """{name: (checkpoint, fp32 bundle exported with --ort-fusions)}, from tiny_bundles' checkpoints."""
    root = tmp_path_factory.mktemp("fused")
    return {name: (ckpt, export(ckpt, root / name, bitlinear="plugin" if name == "bitnet-plugin" else None,
                                ort_fusions=True).path)
            for name, (ckpt, _) in tiny_bundles.items()}


def test_export_writes_no_variant_by_default(tiny_bundles):
    assert all(spec.ort_file is None for spec in load_bundle(tiny_bundles["char-gpt2"][1]).graphs.values())


@pytest.mark.parametrize("family", list(STEP_GRAPHS))
def test_step_graph_variant_holds_the_fused_ops(fused_bundles, family):
    bundle = load_bundle(fused_bundles[family][1])  # checks every ort_file against the manifest entry too
    graph, layers_key = STEP_GRAPHS[family]
    n_layer = bundle.model_config[layers_key]
    spec = bundle.graph(graph)
    assert spec.ort_file == f"onnx/{graph}.ort.onnx"
    fused = contrib_op_counts(onnx.load(str(bundle.path / spec.ort_file)))
    # each block's ln_2 and, after the first, its ln_1, then ln_f: one residual Add + LayerNorm each
    assert fused.get("SkipLayerNormalization", 0) >= 2 * n_layer
    assert fused.get("MultiHeadAttention", 0) == (n_layer if family in FUSED_ATTENTION else 0)
    standard = onnx.load(str(bundle.graph_path(graph)))
    assert not contrib_op_counts(standard) and all(n.domain != MS_DOMAIN for n in standard.graph.node)
    ops = {n.op_type for n in standard.graph.node}
    assert "LayerNormalization" in ops and "Softmax" in ops


def test_bgpt_byte_decoder_attention_is_fused_at_every_byte_with_a_past(fused_bundles):
    bundle = load_bundle(fused_bundles["bgpt"][1])
    cfg = bundle.model_config
    fused = contrib_op_counts(onnx.load(str(bundle.path / bundle.graph("byte_patch_greedy").ort_file)))
    # byte 0 attends to the feature alone (no past: a single-key softmax, left as it is)
    assert fused["MultiHeadAttention"] == (cfg["patch_size"] - 1) * cfg["byte_n_layer"]


@pytest.mark.parametrize("family", ["bitnet", "bitnet-plugin"])
def test_bitnet_graphs_keep_no_variant(fused_bundles, family):
    """BitNet has no LayerNorm (RMSNorm inside each BitLinear, fused by ONNX Runtime at session creation) and rotates
    q and k before attention; the plugin graphs hold bytedeploy custom ops."""
    bundle = load_bundle(fused_bundles[family][1])
    assert all(spec.ort_file is None for spec in bundle.graphs.values())


@pytest.mark.parametrize("family", list(STEP_GRAPHS))
def test_runner_runs_the_variant_unless_turned_off(fused_bundles, family, monkeypatch):
    bundle = load_bundle(fused_bundles[family][1])
    graph = STEP_GRAPHS[family][0]
    assert make_runner(bundle, "ort").graph_file(graph) == bundle.path / bundle.graph(graph).ort_file
    monkeypatch.setenv("BYTEDEPLOY_ORT_FUSIONS", "0")
    assert make_runner(bundle, "ort").graph_file(graph) == bundle.graph_path(graph)


@pytest.mark.parametrize("name", ["char-gpt2", "sigma-gpt", "sigma-gpt burst", "bgpt", "bfn"])
def test_fused_bundles_generate_eager_greedy_output(fused_bundles, name, monkeypatch):
    monkeypatch.delenv("BYTEDEPLOY_ORT_FUSIONS", raising=False)
    ckpt, bundle = fused_bundles[name.split()[0]]
    runner = CliRunner()
    eager = runner.invoke(cli, generate_args(name, ckpt))
    fused = runner.invoke(cli, generate_args(name, bundle))
    assert eager.exit_code == 0 and fused.exit_code == 0, eager.output + fused.output
    assert fused.stdout == eager.stdout and fused.stdout.strip()
