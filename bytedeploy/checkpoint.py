"""The one checkpoint format: a directory holding

  model.safetensors   the weights
  config.json         format version, family, model config, training config, data metadata, step, history
  train_state.pt      optimizer state, RNG states and step (only while training may resume)
  assets/             family files that deployment needs (tokenizer models, vocabularies)

Saves go to a temporary sibling directory that then replaces the old one (bytedeploy/staging.py), so a crash or a
full disk never leaves a half-written checkpoint and never destroys the last good one. Folders and files get the
modes an ordinary mkdir and open give (0755 / 0644 under the usual umask 022).
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bytedeploy import __version__
from bytedeploy.config import config_from_dict, config_to_dict
from bytedeploy.errors import UserError
from bytedeploy.registry import get_family
from bytedeploy.staging import replace_dir, set_default_modes, staging_dir, write_error

FORMAT = "bytedeploy-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
ASSETS = "assets"


@dataclass
class Checkpoint:
    path: Path
    family: str
    model_config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # train config, data description, step, history

    @property
    def assets(self) -> Path:
        return self.path / ASSETS


def save_checkpoint(path: str | Path, model: torch.nn.Module, family: str, model_config, meta: dict | None = None,
                    train_state: dict | None = None, assets: dict[str, Path | bytes] | None = None) -> Path:
    """Write a checkpoint folder at path, replacing an earlier checkpoint there (never any other folder). A write
    that fails (a full disk) is a one-line UserError, and the earlier checkpoint stays as it was."""
    path = Path(path).absolute()
    check_replaceable(path)
    for name in assets or {}:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"asset name {name!r} must be a relative path inside the assets folder")
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "bytedeploy_version": __version__,
           "family": family, "model_config": config_to_dict(model_config), "meta": meta or {}}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(path)
        save_file(_untie(state), tmp / WEIGHTS, metadata={"format": FORMAT, "family": family})
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2, default=str))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        for name, src in (assets or {}).items():
            dst = tmp / ASSETS / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dst.write_bytes(src)
            else:
                shutil.copyfile(src, dst)
        set_default_modes(tmp)
        replace_dir(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise UserError(f"cannot save the checkpoint to {path}: {write_error(e)}; {path} is as it was") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_replaceable(path: str | Path) -> None:
    """UserError unless a save may write path: nothing there, an empty folder, or an earlier checkpoint."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / CONFIG).is_file())):
        raise UserError(f"{path} exists and is not a bytedeploy checkpoint; refusing to replace it")


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): store a copy of each repeat."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json; one-line UserError for anything that is not a bytedeploy checkpoint."""
    path = Path(path)
    if not path.exists():
        left = sorted(path.parent.glob(f".{path.name}.old-*")) if path.name else []
        hint = f" (a save was cut off: {left[-1].name} beside it holds the previous one)" if left else ""
        raise UserError(f"checkpoint not found: {path}{hint}")
    if not path.is_dir() or not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise UserError(f"not a bytedeploy checkpoint (a folder with {CONFIG} and {WEIGHTS}): {path}")
    try:
        doc = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt checkpoint config {path / CONFIG}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"not a bytedeploy checkpoint: {path / CONFIG} has no format {FORMAT!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint format version {doc.get('format_version')} is not supported "
                        f"(this bytedeploy reads version {FORMAT_VERSION}): {path}")
    family = doc.get("family")
    if not isinstance(family, str):
        raise UserError(f"corrupt checkpoint config {path / CONFIG}: no model family")
    get_family(family)
    model_config, meta = doc.get("model_config", {}), doc.get("meta", {})
    if not isinstance(model_config, dict) or not isinstance(meta, dict):
        raise UserError(f"corrupt checkpoint config {path / CONFIG}: model_config and meta must be objects")
    return Checkpoint(path, family, model_config, meta)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"corrupt weights {path / WEIGHTS}: {str(e).splitlines()[0]}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """-> (model in eval mode on device, its Config, the Checkpoint)."""
    ckpt = read_checkpoint(path)
    family = get_family(ckpt.family)
    cfg = config_from_dict(family.Config, ckpt.model_config, what=f"{ckpt.family} model config")
    model = family.Model(cfg)
    load_weights(model, load_state_dict(ckpt.path), source=str(ckpt.path))
    return model.to(device).eval(), cfg, ckpt


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"weights in {source} do not match the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise UserError(f"weights in {source} do not match the model: {k} is {tuple(v.shape)}, "
                            f"the config says {tuple(own[k].shape)}")
    model.load_state_dict(state)


def read_train_state(path: str | Path) -> dict:
    """train_state.pt -> {"optimizer", "step", "rng" (one state per rank), "history"}, and "world_size" (the number
    of ranks that trained it; older files lack it) that lets training resume on another number of ranks."""
    f = Path(path) / TRAIN_STATE
    if not f.is_file():
        raise UserError(f"checkpoint {path} has no {TRAIN_STATE}: it cannot resume training")
    state = load_plain_torch_file(f, "training state")
    keys = ("optimizer", "step", "rng", "history")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise UserError(f"corrupt training state {f}: expected the keys {', '.join(keys)}")
    if isinstance(state["rng"], dict):  # written by one process before per-rank states
        state["rng"] = [state["rng"]]
    return state


def load_plain_torch_file(path: str | Path, what: str):
    """torch.load of tensors and plain data only: a file from elsewhere runs no code. Anything else is a one-line
    UserError that never passes on torch's advice to load the file with weights_only=False."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing a file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except Exception as e:  # torch raises many types for a damaged zip or a pickle it refuses
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in reason:
            reason = "not a PyTorch file of tensors and plain data (other objects are never unpickled)"
        raise UserError(f"cannot read {what} {path}: {reason}") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
