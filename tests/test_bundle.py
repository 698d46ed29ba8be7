"""The bundle format's own guarantees: bundle.json covers itself whatever its layout, a failed export or swap leaves
the old bundle as it was, and replacing a bundle keeps the files export did not write. (Bad bundles through the
CLI, one line each: tests/test_bad_input.py.)"""

import json
import os
import shutil

import pytest
import torch

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.errors import UserError
from bytedeploy.exporters import bundle as bd
from bytedeploy.exporters import export
from bytedeploy.models import bgpt

SMALL = dict(patch_size=8, n_patches=12, n_embd=32, n_layer=1, n_head=4, byte_n_layer=1, byte_n_head=4)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(checkpoint, bundle) of an untrained small bGPT."""
    root = tmp_path_factory.mktemp("bundle")
    cfg = bgpt.Config(**SMALL)
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", bgpt.Model(cfg), "bgpt", cfg)
    export(ckpt, root / "bundle")
    return ckpt, root / "bundle"


def tree(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_manifest_digest_is_of_its_content_not_its_layout(good, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(good[1], copy)
    doc = json.loads((copy / bd.MANIFEST).read_text())
    assert doc[bd.MANIFEST_DIGEST] == bd.manifest_digest(doc)
    (copy / bd.MANIFEST).write_text(json.dumps(dict(reversed(list(doc.items()))), indent=None))  # same content
    assert bd.load_bundle(copy).graphs.keys() == {"patch_prefill", "patch_decode", "byte_patch_greedy", "byte_patch"}
    (copy / bd.MANIFEST).write_text(json.dumps(dict(doc, opset=19)))
    with pytest.raises(UserError, match="bundle.json was edited after export"):
        bd.load_bundle(copy)


def test_a_failed_export_leaves_the_old_bundle_and_no_staging_folder(good, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(good[1], copy)
    before = tree(copy)
    with pytest.raises(RuntimeError, match="exporter broke"):
        with bd.StagedBundle(copy, force=True) as folder:
            (folder / "onnx").mkdir()
            (folder / "onnx" / "prefill.onnx").write_bytes(b"half")
            raise RuntimeError("exporter broke")
    assert tree(copy) == before and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_a_failed_swap_puts_back_the_old_bundle_and_the_carried_files(good, tmp_path, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(good[1], copy)
    (copy / "notes.txt").write_text("mine")
    (copy / "engines").mkdir()
    (copy / "engines" / "byte_patch.engine").write_bytes(b"engine")
    before = tree(copy)
    real_replace = os.replace

    def replace(src, dst):  # the bundle folder itself cannot move in (the files carried into it could)
        if str(dst) == str(copy) and ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    staged = bd.StagedBundle(copy, force=True)
    assert sorted(staged.carried) == ["engines/byte_patch.engine", "notes.txt"]
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        with staged as folder:
            (folder / "onnx").mkdir()
            (folder / "onnx" / "new.onnx").write_bytes(b"new")
    monkeypatch.undo()
    assert tree(copy) == before and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_replacing_a_bundle_whose_manifest_is_unreadable_is_refused(good, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(good[1], copy)
    (copy / bd.MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="cannot tell the bundle's files from others"):
        bd.StagedBundle(copy, force=True)


def test_config_sizes_name_the_fields_each_graph_fixes():
    config = dict(SMALL, n_embd=32)
    assert bd.config_sizes("bgpt", "patch_decode", "past_k.0", config) == [(1, "n_head", 4), (3, "n_embd / n_head", 8)]
    assert bd.config_sizes("bgpt", "patch_decode", "present_v.11", config) == [
        (1, "n_head", 4), (3, "n_embd / n_head", 8)]
    assert bd.config_sizes("bgpt", "byte_patch", "logits", config) == []  # bGPT's 257 symbols are no config field
    assert bd.config_sizes("bgpt", "patch_prefill", "feature_out", config) == [(-1, "n_embd", 32)]
    assert bd.config_sizes("bfn", "step", "log_theta", {"vocab_size": 256, "seq_len": 32}) == [
        (-1, "vocab_size", 256), (1, "seq_len", 32)]
    assert bd.config_sizes("char-gpt2", "decode", "logits", {"block_size": 16}) == []  # a field missing: no check
