"""The checkpoint format: exact round trips, tied weights, assets, crash-safe saves, one-line errors for bad input."""

import json
import os
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bytedeploy import checkpoint as ck
from bytedeploy.cli import cli
from bytedeploy.config import config_to_dict
from bytedeploy.errors import UserError
from bytedeploy.models import bgpt


def tiny_config(**overrides) -> bgpt.Config:
    values = dict(bgpt.PRESETS["tiny"], n_patches=8, n_embd=32, n_layer=1, byte_n_layer=1, patch_sampling_batch_size=0)
    return bgpt.Config(**dict(values, **overrides))


def make_batch(cfg: bgpt.Config) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    files = [bgpt.encode_file(rng.integers(0, 256, size=n, dtype=np.uint8).tobytes(), "txt", cfg) for n in (20, 70)]
    return bgpt.PatchData(files, files, cfg)._collate(np.arange(2), files, None)


@pytest.fixture
def model_and_config():
    torch.manual_seed(0)
    cfg = tiny_config()
    return bgpt.Model(cfg), cfg


@pytest.fixture
def saved(tmp_path, model_and_config):
    model, cfg = model_and_config
    path = tmp_path / "ckpt"
    state = {"optimizer": {}, "step": 3, "rng": [{"torch": torch.get_rng_state()}], "history": {"loss": []}}
    ck.save_checkpoint(path, model, "bgpt", cfg, {"step": 3}, train_state=state)
    return path


def test_round_trip_gives_identical_weights_and_outputs(saved, model_and_config):
    model, cfg = model_and_config
    loaded, loaded_cfg, info = ck.load_model(saved)
    assert loaded_cfg == cfg and info.family == "bgpt" and info.meta == {"step": 3}
    theirs = loaded.state_dict()
    assert set(theirs) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    batch = make_batch(cfg)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch)[0], loaded(batch)[0])
        feats = model.encode_patches(batch["patches"])[0]
        assert torch.equal(feats, loaded.encode_patches(batch["patches"])[0])
        assert torch.equal(model.byte_logits(feats, batch["patches"][0, :, :4]),
                           loaded.byte_logits(feats, batch["patches"][0, :, :4]))


def test_tied_weights_stay_tied_after_load(saved):
    loaded, cfg, _ = ck.load_model(saved)
    assert loaded.lm_head.weight is loaded.byte_wte.weight
    loaded.train()
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded(make_batch(cfg))[0].backward()
    before = loaded.byte_wte.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, loaded.byte_wte.weight)
    assert torch.equal(loaded.lm_head.weight, loaded.byte_wte.weight)


def test_assets_are_saved_and_readable(tmp_path, model_and_config):
    model, cfg = model_and_config
    src = tmp_path / "vocab.txt"
    src.write_bytes(b"a\nb\n")
    path = ck.save_checkpoint(tmp_path / "ckpt", model, "bgpt", cfg,
                              assets={"tokenizer.model": b"\x00\x01binary", "sub/vocab.txt": src})
    info = ck.read_checkpoint(path)
    assert (info.assets / "tokenizer.model").read_bytes() == b"\x00\x01binary"
    assert (info.assets / "sub" / "vocab.txt").read_bytes() == b"a\nb\n"
    with pytest.raises(ValueError, match="relative path"):
        ck.save_checkpoint(tmp_path / "other", model, "bgpt", cfg, assets={"../escape": b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "vocab.txt"]


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_folders(saved, model_and_config, monkeypatch):
    model, cfg = model_and_config
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken_save_file)
    with pytest.raises(UserError, match="cannot save the checkpoint to .*: disk full; .* is as it was"):
        ck.save_checkpoint(saved, model, "bgpt", cfg, {"step": 4})
    monkeypatch.undo()

    real_replace, calls = os.replace, []

    def replace_failing_on_swap_in(src, dst):  # the old folder moves aside, then the new one fails to move in
        calls.append(src)
        if len(calls) == 2:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_on_swap_in)
    with pytest.raises(UserError, match="rename failed"):
        ck.save_checkpoint(saved, model, "bgpt", cfg, {"step": 4})
    monkeypatch.undo()

    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]
    loaded, _, info = ck.load_model(saved)
    assert info.meta == {"step": 3}
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())
    assert ck.read_train_state(saved)["step"] == 3


def test_save_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path, model_and_config):
    model, cfg = model_and_config
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a bytedeploy checkpoint"):
        ck.save_checkpoint(tmp_path, model, "bgpt", cfg)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------- bad checkpoints


def edit_config(path, **changes):
    doc = json.loads((path / ck.CONFIG).read_text())
    doc.update(changes)
    (path / ck.CONFIG).write_text(json.dumps(doc))


def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


CORRUPTIONS = {
    "missing folder": (lambda p: p.rename(p.with_name("gone")), "checkpoint not found"),
    "no config.json": (lambda p: (p / ck.CONFIG).unlink(), "not a bytedeploy checkpoint"),
    "invalid json": (lambda p: (p / ck.CONFIG).write_text("{not json"), "corrupt checkpoint config"),
    "not our format": (lambda p: edit_config(p, format="something-else"), "not a bytedeploy checkpoint"),
    "format version": (lambda p: edit_config(p, format_version=99), "format version 99 is not supported"),
    "unknown family": (lambda p: edit_config(p, family="no-such-family"), "unknown model family"),
    "family not a string": (lambda p: edit_config(p, family=["bgpt"]), "no model family"),
    "unknown config field": (lambda p: edit_config(p, model_config={"n_embd": 32, "colour": 1}), "colour"),
    "truncated weights": (lambda p: truncate(p / ck.WEIGHTS), "corrupt weights"),
    "shape mismatch": (lambda p: edit_config(p, model_config=config_to_dict(tiny_config(n_embd=64))),
                       "do not match the model"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_bad_checkpoints_give_one_line_user_errors(saved, name):
    damage, message = CORRUPTIONS[name]
    damage(saved)
    with pytest.raises(UserError, match=message) as err:
        ck.load_model(saved)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / ck.TRAIN_STATE).unlink(), "cannot resume training"),
    (lambda p: truncate(p / ck.TRAIN_STATE), "cannot read training state"),
    (lambda p: (p / ck.TRAIN_STATE).write_bytes(b"not a torch file"), "cannot read training state"),
    (lambda p: torch.save({"step": 1}, p / ck.TRAIN_STATE), "expected the keys"),
    (lambda p: torch.save({"optimizer": {}, "step": 1, "rng": [], "history": {}, "x": PurePosixPath("/")},
                          p / ck.TRAIN_STATE), "other objects are never unpickled"),  # no code runs from the file
], ids=["missing", "truncated", "garbage", "missing keys", "unsafe object"])
def test_bad_train_state_gives_one_line_user_error(saved, damage, message):
    damage(saved)
    with pytest.raises(UserError, match=message) as err:
        ck.read_train_state(saved)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_cli_reports_bad_checkpoints_in_one_line(saved):
    (saved / ck.TRAIN_STATE).unlink()
    result = CliRunner().invoke(cli, ["train", "bgpt", "--resume", "-o", str(saved)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "cannot resume training" in result.output
    assert result.output.count("\n") == 1
    truncate(saved / ck.WEIGHTS)
    result = CliRunner().invoke(cli, ["generate", str(saved), "--max-new", "4"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: corrupt weights") and result.output.count("\n") == 1
