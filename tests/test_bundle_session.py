"""The batched bundle session (runtimes/bundle_session.py) on ONNX Runtime's CPU provider: rows at different
positions in one batched call, joining at step boundaries (bGPT: patch boundaries) and leaving when done; each row's
streamed and final output equals offline generate() on the bundle for the same request alone, greedy and sampled."""

from __future__ import annotations

import pytest
from test_bgpt_batch import run_session

from bytedeploy.generation import GenerateRequest
from bytedeploy.runner import open_model
from bytedeploy.runtimes.bundle_session import BgptSession, TokenSession
from bytedeploy.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = [b"", b"a", b"import ", b"def f(x):", b"xyz123", b"hello world!", b"0123456789abcdef", b"Q"]
SESSIONS = {"char-gpt2": TokenSession, "bitnet": TokenSession, "sigma-gpt": TokenSession, "bgpt": BgptSession}


def requests_for(family: str) -> list[GenerateRequest]:
    """Different prompts and lengths (BitNet's 40 new bytes after a long prompt slide its 32-byte window), a random
    generation order for sigma-GPT, and two sampled rows."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        max_new = (5, 13, 40)[i % 3] if family != "bgpt" else (0, 13)[i % 2]
        sampling = SamplingConfig(top_k=5, top_p=0.9, temperature=0.8, seed=i) if i in (2, 5) else GREEDY
        options = {"order": "random"} if family == "sigma-gpt" and i % 2 else {}
        out.append(GenerateRequest(prompt, max_new, 1, sampling, options))
    return out


@pytest.mark.parametrize("family", list(SESSIONS))
def test_rows_joining_at_steps_give_offline_generates_output(tiny_bundles, family):
    _, bundle = tiny_bundles[family]
    model = open_model(bundle, "ort")
    requests = requests_for(family)
    expected = [model.generate(r).outputs[0] for r in requests]
    session = model.session(3)
    assert isinstance(session, SESSIONS[family])
    got = run_session(session, requests, join_at=[i // 2 for i in range(len(requests))])  # up to two join per step
    assert [got[i] for i in range(len(requests))] == expected
    assert len({len(e) for e in expected}) > 1  # rows leave at different steps


def test_bundle_session_rows_equal_eager(tiny_bundles):
    """The same greedy requests on the checkpoint's eager backend: the bundle session's rows are eager's."""
    ckpt, bundle = tiny_bundles["char-gpt2"]
    requests = [GenerateRequest(p, 20, 1, GREEDY, {}) for p in PROMPTS[:4]]
    eager = open_model(ckpt, "eager", device="cpu")
    got = run_session(open_model(bundle, "ort").session(4), requests, join_at=[0, 0, 3, 5])
    assert [got[i] for i in range(4)] == [eager.generate(r).outputs[0] for r in requests]
