"""Bad bundles and bad export targets: each is a one-line 'Error: ...' naming the problem, exit status 1, and
nothing written or overwritten."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.models import bgpt


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(checkpoint, bundle) of an untrained tiny bGPT."""
    root = tmp_path_factory.mktemp("bundle")
    cfg = bgpt.Config(**bgpt.PRESETS["tiny"])
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", bgpt.Model(cfg), "bgpt", cfg)
    result = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(root / "bundle")])
    assert result.exit_code == 0, result.output
    return ckpt, root / "bundle"


def one_line_error(result, *words):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def edit_manifest(bundle, change):
    doc = json.loads((bundle / "bundle.json").read_text())
    change(doc)
    (bundle / "bundle.json").write_text(json.dumps(doc))


def set_custom_op(op):
    def change(doc):
        doc["graphs"][2]["custom_ops"] = [op]
    return change


def append_byte(path):
    with open(path, "ab") as f:
        f.write(b"\0")


BAD_BUNDLES = {
    "other version": (lambda b: edit_manifest(b, lambda d: d.update(bytedeploy_version="0.0.1")),
                      ["written by bytedeploy 0.0.1", "export it again"]),
    "missing graph": (lambda b: (b / "onnx" / "byte_step.onnx").unlink(), ["missing onnx/byte_step.onnx"]),
    "edited graph": (lambda b: append_byte(b / "onnx" / "patch_decode.onnx"),
                     ["onnx/patch_decode.onnx", "sha256 mismatch"]),
    "old opset": (lambda b: edit_manifest(b, lambda d: d.update(opset=17)), ["opset 17", "opset 18 or newer"]),
    "unknown bytedeploy op": (lambda b: edit_manifest(b, set_custom_op("bytedeploy::Nope")),
                              ["byte_step", "'bytedeploy::Nope'"]),
    "foreign op": (lambda b: edit_manifest(b, set_custom_op("foo::Bar")), ["'foo::Bar'", "does not implement"]),
    "unknown precision": (lambda b: edit_manifest(b, lambda d: d.update(precision="fp8")), ["precision 'fp8'"]),
    "bad model config": (lambda b: edit_manifest(b, lambda d: d.update(model_config=[1, 2])), ["model_config"]),
    "unknown family": (lambda b: edit_manifest(b, lambda d: d.update(family="gpt5")), ["unknown model family"]),
}


@pytest.mark.parametrize("command", ["generate", "verify"])
@pytest.mark.parametrize("bad", list(BAD_BUNDLES))
def test_bad_bundle_is_refused(good, tmp_path, bad, command):
    ckpt, bundle = good
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    spoil, words = BAD_BUNDLES[bad]
    spoil(copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    if command == "generate":
        args = ["generate", str(copy), "--max-new", "4", "-o", str(tmp_path / "out.txt")]
    else:
        args = ["verify", str(ckpt), str(copy)]
    one_line_error(CliRunner().invoke(cli, args), *words)
    assert not (tmp_path / "out.txt").exists()
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_edited_manifest_file_list_is_refused(good, tmp_path):
    """A graph the manifest lists but does not hash cannot slip past the sha256 check."""
    copy = tmp_path / "bundle"
    shutil.copytree(good[1], copy)
    edit_manifest(copy, lambda d: d["files"].pop("onnx/byte_step.onnx"))
    one_line_error(CliRunner().invoke(cli, ["generate", str(copy)]), "byte_step", "not in the manifest")


def test_export_into_a_folder_that_is_not_a_bundle(good, tmp_path):
    ckpt, _ = good
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--force"]):
        one_line_error(CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(out), *extra]), "is not a bundle")
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no staging folder left behind


def test_export_over_a_bundle_needs_force(good, tmp_path):
    ckpt, bundle = good
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = (copy / "bundle.json").read_bytes()
    one_line_error(CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(copy)]), "exists", "--force")
    assert (copy / "bundle.json").read_bytes() == manifest


def test_export_of_a_missing_checkpoint(tmp_path):
    out = tmp_path / "bundle"
    one_line_error(CliRunner().invoke(cli, ["export", str(tmp_path / "nope"), "-o", str(out)]),
                   "checkpoint not found", "nope")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_not_a_bundle(tmp_path):
    (tmp_path / "bundle.json").write_text("{\"format\": \"something else\"}")
    one_line_error(CliRunner().invoke(cli, ["generate", str(tmp_path)]), "not a bytedeploy bundle")


def test_a_graph_the_loop_needs_left_out_of_the_manifest(good, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(good[1], copy)
    edit_manifest(copy, lambda d: d["graphs"].pop(2))  # byte_step
    result = CliRunner().invoke(cli, ["generate", str(copy), "--max-new", "4"])
    one_line_error(result, "no graph 'byte_step'", "it has patch_prefill, patch_decode")
