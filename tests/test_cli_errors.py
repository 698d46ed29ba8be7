"""Bad input through the CLI: each case exits non-zero with one line 'Error: ...', no traceback, and leaves every
file it was pointed at as it was."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import cli
from bytedeploy.models import bgpt

SMALL = dict(patch_size=8, n_patches=12, n_embd=32, n_layer=1, n_head=4, byte_n_layer=1, byte_n_head=4)


def invoke_error(*args) -> str:
    """Run the CLI; assert it failed with exactly one line of output, 'Error: ...', and no exception escaped."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a crash
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(path: Path) -> dict:
    """Every file under path with its modification time and bytes."""
    return {p.relative_to(path).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A checkpoint of a small random bGPT, written the way train writes one."""
    cfg = bgpt.Config(**SMALL)
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", bgpt.Model(cfg), "bgpt", cfg, {"data": "builtin:stdlib"})


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        (folder / f"f{i}.txt").write_bytes(b"some text\n" * (i + 1))
    return folder


def test_missing_empty_and_non_folder_data(tmp_path, data):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert "data path not found" in invoke_error("train", "bgpt", "--data", tmp_path / "nope", "-o", out)
    assert "no files found" in invoke_error("train", "bgpt", "--data", tmp_path / "empty", "-o", out)
    assert "not a folder" in invoke_error("train", "bgpt", "--data", data / "f0.txt", "-o", out)
    assert "no file pairs" in invoke_error("train", "bgpt", "--data", data, "--conversion", "abc->mid", "-o", out)
    assert not out.exists()  # nothing was created on the way to the error


def test_bad_family_preset_and_options(tmp_path, data):
    out = tmp_path / "out"
    common = ("--data", data, "-o", out, "--steps", 1)
    assert "unknown model family 'gpt5'" in invoke_error("train", "gpt5", *common)
    assert "unknown model option 'n_foo'" in invoke_error("train", "bgpt", "--set", "n_foo=3", *common)
    assert "cannot read 'x' as int" in invoke_error("train", "bgpt", "--set", "n_layer=x", *common)
    assert "unknown preset 'huge'" in invoke_error("train", "bgpt", "--preset", "huge", *common)
    assert "n_patches >= 3" in invoke_error("train", "bgpt", "--context", 2, *common)
    assert "must divide" in invoke_error("train", "bgpt", "--d-model", 30, *common)
    assert not out.exists()


def test_generate_prompt_over_the_limit(ckpt):
    max_bytes = bgpt.Config(**SMALL).max_bytes
    before = snapshot(ckpt)
    line = invoke_error("generate", ckpt, "--prompt", "x" * (max_bytes + 1))
    assert f"prompt of {max_bytes + 1} bytes exceeds the model's limit of {max_bytes} bytes" in line
    assert "not found" in invoke_error("generate", ckpt, "--input", ckpt / "nope.abc", "--to", "mid")
    assert snapshot(ckpt) == before


def test_missing_and_corrupt_checkpoints(tmp_path, ckpt):
    assert "checkpoint not found" in invoke_error("generate", tmp_path / "nope", "--prompt", "a")
    assert "not a bytedeploy checkpoint" in invoke_error("eval", ckpt / "config.json")

    config = ckpt / "config.json"
    good_config = config.read_text()
    config.write_text("{not json")
    assert "corrupt checkpoint config" in invoke_error("generate", ckpt, "--prompt", "a")
    assert config.read_text() == "{not json"

    doc = json.loads(good_config)
    config.write_text(json.dumps(dict(doc, family="gpt5")))
    assert "unknown model family 'gpt5'" in invoke_error("eval", ckpt)

    doc["model_config"]["n_embd"] = 64  # the weights are 32 wide
    config.write_text(json.dumps(doc))
    assert "do not match the model" in invoke_error("generate", ckpt, "--prompt", "a")

    config.write_text(good_config)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    before = snapshot(ckpt)
    assert "corrupt weights" in invoke_error("generate", ckpt, "--prompt", "a")
    assert "corrupt weights" in invoke_error("eval", ckpt)
    assert snapshot(ckpt) == before


def test_train_into_an_existing_checkpoint_leaves_it_untouched(ckpt, data):
    before = snapshot(ckpt)
    line = invoke_error("train", "bgpt", "--data", data, "--steps", 1, "-o", ckpt)
    assert "already exists; use --resume" in line
    assert snapshot(ckpt) == before
    # a folder that is not a checkpoint is never replaced, not even with --force
    other = ckpt.parent / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert "not a bytedeploy checkpoint" in invoke_error("train", "bgpt", "--data", data, "--steps", 1, "--force",
                                                         "-o", other)
    assert (other / "mine.txt").read_text() == "keep me"


def test_resume_of_a_checkpoint_without_a_training_run(ckpt):
    # e.g. an imported or hand-saved checkpoint: weights and a training state, but no train_config in its meta
    torch.save({"optimizer": {}, "step": 0, "rng": [], "history": {}}, ckpt / "train_state.pt")
    before = snapshot(ckpt)
    line = invoke_error("train", "bgpt", "--resume", "-o", ckpt)
    assert "holds no training run to resume (no train_config" in line and "--init" in line
    assert snapshot(ckpt) == before


def test_generate_onto_an_existing_file(tmp_path, ckpt):
    out = tmp_path / "sample.txt"
    out.write_bytes(b"precious")
    before = out.stat().st_mtime_ns
    assert "exists; use --force" in invoke_error("generate", ckpt, "--prompt", "a", "--max-new", 4, "-o", out)
    assert out.read_bytes() == b"precious" and out.stat().st_mtime_ns == before
    result = CliRunner().invoke(cli, ["generate", str(ckpt), "--prompt", "a", "--max-new", "4", "-o", str(out),
                                      "--force", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != b"precious"


def test_import_errors(tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_bytes(b"not a torch file")
    out = tmp_path / "imported"
    assert "weights not found" in invoke_error("import", "bgpt", tmp_path / "nope.pth", "-o", out)
    assert "cannot read" in invoke_error("import", "bgpt", junk, "-o", out)
    torch.save({"model": {"foo": torch.zeros(2)}}, junk)
    assert "not an official bGPT checkpoint" in invoke_error("import", "bgpt", junk, "-o", out)
    # the head count is not in the shapes: one that does not divide the width is bad input, not a crash
    model = bgpt.Model(bgpt.Config(**SMALL))
    official = {"patch_level_decoder.patch_embedding.weight": model.patch_embedding.weight,
                "patch_level_decoder.base.wpe.weight": model.patch_decoder.wpe.weight}
    torch.save({"model": official}, junk)
    assert "must divide" in invoke_error("import", "bgpt", junk, "-o", out, "--n-head", 5)
    assert not out.exists()


def test_backends_this_machine_or_this_input_cannot_run(ckpt, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert invoke_error("generate", ckpt, "--backend", "native", "--prompt", "a") == \
        "Error: the native backend needs a CUDA GPU"
    assert "bgpt has no backend 'burst'; available: eager-reference, eager, native, native+compile" in \
        invoke_error("generate", ckpt, "--backend", "burst", "--prompt", "a")


def test_output_paths_and_devices_are_checked_before_any_work(tmp_path, ckpt):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = invoke_error("train", "bgpt", "--steps", 1, "-o", a_file)
    assert line == f"Error: {a_file} is a file, not a checkpoint folder"
    assert "is a file, not a folder" in invoke_error("generate", ckpt, "--prompt", "a", "-o", a_file / "x.txt")
    assert "unknown device 'foo'" in invoke_error("generate", ckpt, "--prompt", "a", "--device", "foo")
    bench = ("bench", ckpt, "--backends", "eager", "--batch-sizes", 1, "--max-new", 2, "--repeats", 1)
    assert f"{a_file} exists; use --force" in invoke_error(*bench, "--out", a_file)
    assert "is a file, not a folder" in invoke_error(*bench, "--plot", a_file / "p.png")
    assert "unknown device 'foo'" in invoke_error(*bench, "--device", "foo")
    assert a_file.read_text() == "x"
    assert "opset 99 is newer" in invoke_error("export", ckpt, "-o", tmp_path / "b", "--opset", 99)
    assert not (tmp_path / "b").exists()


def test_ort_custom_ops_without_onnxruntime_extensions_is_a_one_line_error(tmp_path, monkeypatch):
    import sys

    from bytedeploy.errors import UserError
    from bytedeploy.runtimes.ort import make_session

    monkeypatch.delitem(sys.modules, "bytedeploy.plugins.ort_ops", raising=False)
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails as if not installed
    with pytest.raises(UserError) as e:
        make_session(tmp_path / "model.onnx", custom_ops=True)
    assert "\n" not in str(e.value) and "pip install onnxruntime-extensions" in str(e.value)
