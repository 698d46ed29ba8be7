"""The step graphs' shared pieces (exporters/onnx_graphs.py), on the CPU: the sample graph draws bytedeploy.sampling's
tokens from the same uniforms, with settings per row; and no graph computes a device value from a traced shape
(ONNX Runtime's CUDA provider would copy it from the host inside the step, which keeps it from capturing the step in
a CUDA graph)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from bytedeploy.exporters.bundle import load_bundle
from bytedeploy.exporters.onnx_graphs import export_sample_graph
from bytedeploy.runtimes.ort import make_session
from bytedeploy.runtimes.windowed import sampling_arrays
from bytedeploy.sampling import SamplingConfig, sample

# Inputs that ONNX Runtime reads on the host (shapes, axes, bounds): a traced shape may flow into these.
HOST_INPUTS = {("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0), ("Slice", 1), ("Slice", 2), ("Slice", 3),
               ("Slice", 4), ("Tile", 1), ("Range", 0), ("Range", 1), ("Range", 2), ("Squeeze", 1), ("Unsqueeze", 1),
               ("Split", 1), ("TopK", 1), ("ReduceSum", 1), ("ReduceMax", 1), ("CumSum", 1), ("Clip", 1), ("Clip", 2)}


def test_sample_graph_draws_the_numpy_samplers_tokens(tmp_path):
    V, N = 40, 64
    spec = export_sample_graph(tmp_path, V, torch.float32, 18)
    session = make_session(tmp_path / spec.file)
    rng = np.random.default_rng(0)
    samplings = [SamplingConfig(top_k=int(rng.integers(0, 8)), top_p=float(rng.choice([1.0, 0.9, 0.3])),
                                temperature=float(rng.choice([0.0, 0.5, 1.0, 2.0]))) for _ in range(N)]
    logits = (rng.standard_normal((N, V)) * 3).astype(np.float32)
    u = rng.random(N)
    expected = [sample(logits[i:i + 1], s, np.random.default_rng([7, i]))[0] for i, s in enumerate(samplings)]
    draws = np.array([np.random.default_rng([7, i]).random() for i in range(N)])  # what each sample() drew
    seq, pos = np.zeros((N, 3), dtype=np.int64), np.full(N, 1)
    (got,) = session.run(None, {"logits": logits, "u": np.where([s.greedy for s in samplings], u, draws)
                                .astype(np.float32), **sampling_arrays(samplings), "seq": seq, "pos": pos})
    assert (got[:, 1] == expected).all() and (got[:, [0, 2]] == 0).all()
    assert len(set(got[:, 1].tolist())) > 5


def host_values_on_the_device(path) -> list[str]:
    """Nodes that compute a device value from a traced shape: a Shape's output reaching a data input of a node
    whose result is not itself only used as a host input."""
    g = onnx.load(str(path), load_external_data=False).graph
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i, x in enumerate(n.input):
            consumers[x].append((n, i))
    outputs = {o.name for o in g.output}
    host = set()  # nodes whose every result is only read on the host
    changed = True
    while changed:
        changed = False
        for n in g.node:
            uses = [(c, i) for o in n.output for c, i in consumers[o]]
            if n.name in host or not uses or any(o in outputs for o in n.output):
                continue
            if all((c.op_type, i) in HOST_INPUTS or c.name in host for c, i in uses):
                host.add(n.name)
                changed = True
    shaped, bad = set(), []
    for n in g.node:
        if n.op_type == "Shape":
            shaped.update(n.output)
            continue
        if any(x in shaped for i, x in enumerate(n.input) if (n.op_type, i) not in HOST_INPUTS):
            shaped.update(n.output)
            if n.name not in host:
                bad.append(f"{n.op_type} {n.name}")
    return bad


@pytest.mark.parametrize("family", ["char-gpt2", "bitnet", "sigma-gpt", "bgpt", "bfn"])
def test_no_graph_computes_device_values_from_shapes(tiny_bundles, family):
    bundle = load_bundle(tiny_bundles[family][1])
    for name in bundle.graphs:
        assert host_values_on_the_device(bundle.graph_path(name)) == [], name
