"""benchmarks/fidelity.py: each claim's protocol end to end at its test scale, the ABC/MIDI pairs, the per-instruction
scoring of predicted CPU traces, and BitNet's full-precision twin (mode=fp)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bytedeploy.benchmarks import fidelity
from bytedeploy.data import abc_midi, cpu_states
from bytedeploy.errors import UserError

CPU = torch.device("cpu")


def test_abc_tunes_are_seeded_and_varied():
    tunes = [abc_midi.random_tune(np.random.default_rng(7), i) for i in range(2)]
    again = [abc_midi.random_tune(np.random.default_rng(7), i) for i in range(2)]
    assert tunes == again
    rng = np.random.default_rng(0)
    many = [abc_midi.random_tune(rng, i) for i in range(60)]
    assert len(set(many)) == 60
    headers = [dict(line.split(":", 1) for line in t.splitlines()[:5]) for t in many]
    assert len({h["K"] for h in headers}) >= 6 and {h["M"] for h in headers} == set(abc_midi.METERS)
    assert {h["L"] for h in headers} == {"1/8", "1/4"}
    assert any("|:" in t for t in many) and any("|]" in t for t in many) and any("[" in t.split("K:")[1] for t in many)


def test_write_pairs_is_deterministic_and_its_midi_parses(tmp_path):
    first = abc_midi.write_pairs(tmp_path / "a", 3, seed=5)
    second = abc_midi.write_pairs(tmp_path / "b", 3, seed=5)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".mid").read_bytes() == b.with_suffix(".mid").read_bytes()
        notes = abc_midi.parse_midi(a.with_suffix(".mid").read_bytes())
        assert notes and all(0 <= pitch < 128 and length > 0 for _, pitch, length in notes)
    assert abc_midi.parse_midi(b"MThd not a midi file") is None


def test_converter_applies_key_chords_and_repeats():
    """G major: F is F sharp (66); [GBd] a chord of three notes; the repeat is written out (second pass at 6.0)."""
    abc = "X:1\nT:t\nM:2/4\nL:1/8\nK:G\n|: [GBd] A B c | d2 F2 | [ceg]4 :|\n"
    once = [(0.0, 67, 0.5), (0.0, 71, 0.5), (0.0, 74, 0.5), (0.5, 69, 0.5), (1.0, 71, 0.5), (1.5, 72, 0.5),
            (2.0, 74, 1.0), (3.0, 66, 1.0), (4.0, 72, 2.0), (4.0, 76, 2.0), (4.0, 79, 2.0)]
    assert abc_midi.midi_notes(abc_midi.abc_to_midi(abc)) == once + [(t + 6.0, p, d) for t, p, d in once]
    assert abc_midi.triad("F", 4) == "[ceg]" and abc_midi.triad("Bm", 5) == "[gbd']"


def test_cpu_state_scoring_per_instruction():
    program = bytes([cpu_states.OP["LOADI"], 7, 0, 0, cpu_states.OP["INC"], 0, 0, 0, cpu_states.OP["MOV"], 1, 2, 0])
    true = cpu_states.run_program(program + bytes(4), memory_size=64, registers=list(range(10)))
    assert fidelity.state_labels(true, 64) == ["(fetch)", "LOADI", "INC", "MOV"]
    right = lambda pred: [p == t for p, t in fidelity.state_pairs(pred, true, 64)]
    assert right(true) == [True] * 4
    broken = bytearray(true)
    broken[64 + 16 * 3 + 1] ^= 1  # ACC of the state INC made
    assert right(bytes(broken)) == [True, True, False, True]
    assert fidelity.state_pairs(bytes(broken), true, 64)[2][0][1] != true[64 + 16 * 3 + 1]
    assert right(true[:64 + 16 * 2]) == [True, False, False, False]


def test_distinct_rates():
    assert fidelity.distinct_rates(["abab"], max_n=2) == {"distinct_1": 0.5, "distinct_2": 2 / 3}


@pytest.mark.parametrize("claim", fidelity.CLAIMS)
def test_claim_runs_end_to_end_at_test_scale(claim):
    doc = fidelity.run_claim(claim, CPU, "test")
    assert doc["claim"] == claim and doc["paper"] and doc["machine"]
    res = doc["result"]
    json.dumps(doc)  # what --out writes
    if claim in ("cpu-states", "abc2mid"):
        assert res["curve"] and res["curve"][-1]["train_seconds"] >= 60 * SCALE(claim)["minutes"]
        assert [p["step"] for p in res["curve"]] == sorted({p["step"] for p in res["curve"]})
    if claim == "cpu-states":
        point = res["curve"][-1]
        assert 0 <= point["state_accuracy"] <= 1 and point["eval_bits_per_byte"] > 0
        counted = sum(n for _, n in point["per_instruction"].values())
        assert counted >= SCALE(claim)["num_test"] and "(fetch)" in point["per_instruction"]
        assert set(point["field_accuracy"]) == {"PC", "ACC", "IR", "registers"}
        assert all(point["state_accuracy"] <= share <= 1 for share in point["field_accuracy"].values())
        assert res["evaluate_command_output"].startswith("accuracy: ")
    elif claim == "abc2mid":
        point = res["final"]
        assert point["target_bits_per_byte"] > 0 and point["pair_bits_per_byte"] > 0
        assert all(0 <= point[k] <= 1 for k in ("parse_share", "notes_match_share", "bytes_match_share"))
    elif claim == "sigma-burst":
        rows = {(r["method"], r["sampling"]): r for r in res["rows"]}
        assert rows[("ar", "greedy")]["passes_per_char"] == 1.0
        for n in SCALE(claim)["orders"]:
            for sampling in ("greedy", "temperature 1.0"):
                row = rows[(f"burst-{n}", sampling)]
                assert 0 < row["passes_per_char"] <= 2 and math.isfinite(row["evaluator_nll_per_char"])
                assert 0 < row["distinct_1"] <= 1
        assert rows[("reference", "held-out text")]["evaluator_nll_per_char"] > 0
    else:
        assert {(r["size"], r["mode"]) for r in res["runs"].values()} == {("a", m) for m in ("fp", "b1.58", "b1")}
        for key, gap in res["gap_to_fp_bits_per_byte"].items():
            bits = dict(res["runs"][key]["eval_bits_per_byte"])
            fp = dict(res["runs"][f"{key.split('/')[0]}/fp"]["eval_bits_per_byte"])
            assert gap == [[s, bits[s] - fp[s]] for s in bits]


def SCALE(claim):
    return fidelity.SCALES[claim]["test"]


def test_main_writes_json_and_plot(tmp_path):
    out = tmp_path / "r.json"
    fidelity.main(["--claim", "bitnet", "--scale", "test", "--device", "cpu", "--steps", "2", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["settings"]["steps"] == 2 and out.with_suffix(".png").stat().st_size > 0
    # a run's JSON plotted again, as after a run on a machine without matplotlib
    fidelity.main(["--replot", str(out), "--plot", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="Error: .* is not a fidelity results file"):
        fidelity.main(["--replot", str(tmp_path / "again.png")])
    with pytest.raises(SystemExit):  # argparse: neither --claim nor --replot
        fidelity.main([])


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="--steps"):
        fidelity.run_claim("bitnet", CPU, "test", minutes=1.0)
    with pytest.raises(UserError, match="--minutes"):
        fidelity.run_claim("abc2mid", CPU, "test", steps=3)
    with pytest.raises(SystemExit, match="Error: "):
        fidelity.main(["--claim", "bitnet", "--device", "tpu"])


def test_bitnet_fp_twin_is_bitlinear_without_quantizers():
    from bytedeploy.cli import build_model_config
    from bytedeploy.models import bitnet
    from bytedeploy.models.bitlinear import BitLinear

    layer = BitLinear(8, 4, mode="fp")
    x = torch.randn(3, 8)
    assert torch.allclose(layer(x), F.linear(layer.norm(x), layer.weight))
    assert not torch.allclose(BitLinear(8, 4)(x), F.linear(layer.norm(x), layer.weight))
    cfg = build_model_config(bitnet, "tiny", {"mode": "fp"})
    model = bitnet.Model(cfg)
    assert {m.mode for m in model.modules() if isinstance(m, BitLinear)} == {"fp"}
    with pytest.raises(UserError, match="mode"):
        build_model_config(bitnet, "tiny", {"mode": "fp16"})


def test_bitnet_fp_twin_is_not_exported(tmp_path):
    from bytedeploy.cli import build_model_config
    from bytedeploy.exporters.bitnet import export_graphs
    from bytedeploy.models import bitnet

    cfg = build_model_config(bitnet, "tiny", {"mode": "fp"})
    with pytest.raises(UserError, match="full-precision twin"):
        export_graphs(bitnet.Model(cfg), cfg, tmp_path, "fp32", None, 18)
