"""Bad input through the CLI, in one table (issue 21 and every earlier case).

Each case runs in a fresh copy of a small workspace (checkpoints, bundles, data folders) and must end with exactly
one `Error: ...` line: exit status 1 for bad input the command found, 2 for click's usage errors (which print the
usage lines first); no traceback; and every file and folder of the workspace as it was (sha256 of each, before and
after: nothing written, nothing deleted, no staging folder left behind). After the table: the inputs the issue found
accepted silently or mishandled that now do the right thing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.cli import check_conversion, cli
from bytedeploy.errors import UserError
from bytedeploy.exporters import export
from bytedeploy.exporters.bundle import MANIFEST_DIGEST, load_bundle, write_manifest_doc
from bytedeploy.models import bgpt, char_gpt2, sigma_gpt
from bytedeploy.tokenizers import CharTokenizer

SMALL_BGPT = dict(patch_size=8, n_patches=12, n_embd=32, n_layer=1, n_head=4, byte_n_layer=1, byte_n_head=4)
TEXT = "def main():\n    return [x for x in range(10)]\n"
DISK_FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


# ------------------------------------------------------------------------------------------------ the workspace


def text_checkpoint(path: Path, module, family: str, **sizes) -> Path:
    tokenizer = CharTokenizer.from_text(TEXT)
    cfg = module.Config(**sizes, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    return save_checkpoint(path, module.Model(cfg), family, cfg, assets={module.TOKENIZER_FILE: tokenizer.to_json()})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The workspace every case starts from."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = bgpt.Config(**SMALL_BGPT)
    torch.manual_seed(0)
    trained_as = {"data": "builtin:stdlib", "data_options": {"eval_split": 0.05, "conversion": None}}
    save_checkpoint(root / "bgpt", bgpt.Model(cfg), "bgpt", cfg, trained_as)
    export(root / "bgpt", root / "bgpt-bundle")
    text_checkpoint(root / "char", char_gpt2, "char-gpt2", block_size=16, n_layer=1, n_head=2, n_embd=32)
    export(root / "char", root / "char-bundle")
    text_checkpoint(root / "sigma", sigma_gpt, "sigma-gpt", block_size=16, n_layer=1, n_head=2, n_embd=32)
    for i in range(3):
        (root / "data" / f"f{i}.txt").parent.mkdir(exist_ok=True)
        (root / "data" / f"f{i}.txt").write_bytes(b"some text\n" * (i + 1))
    (root / "empty-files").mkdir()
    for name in ("a.txt", "b.py", "sub/c.txt"):
        (root / "empty-files" / name).parent.mkdir(exist_ok=True)
        (root / "empty-files" / name).write_bytes(b"")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("keep me")
    (root / "outside").mkdir()
    (root / "outside" / "secret.bin").write_bytes(b"not the bundle's")
    (root / "a_file").write_text("x")
    (root / "tune.abc").write_text("X:1\nK:C\nCDEF|\n")
    return root


@dataclass
class Workspace:
    root: Path
    monkeypatch: pytest.MonkeyPatch

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: sha256 for files (through symlinks), 'dir' for folders, the target for links."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ case helpers


def edit_manifest(bundle: Path, change: Callable[[dict], None], reseal: bool = False) -> None:
    """Edit bundle.json by hand (its manifest_sha256 then no longer matches), or, with reseal, as a tool that
    rewrites the digest would: the checks behind the digest must still refuse the edit."""
    doc = json.loads((bundle / "bundle.json").read_text())
    change(doc)
    if reseal:
        write_manifest_doc(bundle, {k: v for k, v in doc.items() if k != MANIFEST_DIGEST})
    else:
        (bundle / "bundle.json").write_text(json.dumps(doc, indent=2))


def resealed(change):
    return lambda bundle: edit_manifest(bundle, change, reseal=True)


def by_hand(change):
    return lambda bundle: edit_manifest(bundle, change)


def graph(doc: dict, name: str) -> dict:
    return next(g for g in doc["graphs"] if g["name"] == name)


def set_n_layer(doc):
    doc["model_config"]["n_layer"] = 2


def rename_input(doc):
    graph(doc, "byte_patch_greedy")["inputs"][1]["name"] = "forced_bytes"


def set_fp16(doc):
    doc["precision"] = "fp16"


def set_vocab(doc):
    doc["model_config"]["vocab_size"] += 1


def raise_block_size(doc):
    doc["model_config"]["block_size"] *= 4


def rehash(bundle: Path, rel: str) -> None:
    """Record rel's current sha256 in the manifest (and reseal it): a file swapped in by someone who knew how."""
    digest = hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
    edit_manifest(bundle, lambda d: d["files"].update({rel: digest}), reseal=True)


def outside(bundle: Path) -> Path:
    """A folder of the workspace beside the bundle."""
    return bundle.parent / "outside"


def link_graph_outside(bundle: Path) -> None:
    target = outside(bundle) / "byte_patch.onnx"
    shutil.move(bundle / "onnx" / "byte_patch.onnx", target)
    (bundle / "onnx" / "byte_patch.onnx").symlink_to(target)


def link_assets_outside(bundle: Path) -> None:
    (bundle / "assets").symlink_to(outside(bundle), target_is_directory=True)


def link_engine_outside(bundle: Path) -> None:
    (bundle / "engines").mkdir()
    (bundle / "engines" / "byte_patch.engine").symlink_to(outside(bundle) / "secret.bin")


def append_byte(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0")


def external_data_outside(bundle: Path) -> None:
    """byte_patch.onnx reads one initializer from ../../outside/secret.bin (hashed and resealed)."""
    path = bundle / "onnx" / "byte_patch.onnx"
    model = onnx.load(str(path))
    tensor = model.graph.initializer[0]
    onnx.external_data_helper.set_external_data(tensor, location="../../outside/secret.bin")
    tensor.ClearField("raw_data")
    onnx.save(model, str(path))
    rehash(bundle, "onnx/byte_patch.onnx")


def full_disk_onnx_export(module, args, f, *rest, **options):
    """torch.onnx.export on a full disk: a few bytes land, then the write fails."""
    Path(f).write_bytes(b"\x08\x07")
    raise OSError(errno.ENOSPC, DISK_FULL, str(f))


def full_disk_save_file(tensors, filename, metadata=None):
    """safetensors' save_file on a full disk, as it reports it."""
    Path(filename).write_bytes(b"\0" * 64)
    raise SafetensorError(f'Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, message: '
                          f'"{DISK_FULL}" }})')


def official_weights(path: Path, width: int) -> Path:
    """The two tensors config_from_official reads, saved as the official training script saves its weights."""
    model = bgpt.Model(bgpt.Config(**SMALL_BGPT))
    official = {"patch_level_decoder.patch_embedding.weight": torch.zeros(width, model.patch_embedding.in_features),
                "patch_level_decoder.base.wpe.weight": model.patch_decoder.wpe.weight}
    torch.save({"model": official}, path)
    return path


def pickled_path_object(path: Path) -> Path:
    torch.save({"model": {"x": PurePosixPath("/")}}, path)
    return path


def no_cuda(ws: Workspace) -> None:
    ws.monkeypatch.setattr("torch.cuda.is_available", lambda: False)


def resume_state_without_run(ws: Workspace) -> None:
    torch.save({"optimizer": {}, "step": 0, "rng": [], "history": {}}, ws / "bgpt" / "train_state.pt")


# ------------------------------------------------------------------------------------------------ the table


@dataclass
class Case:
    run: Callable[[Workspace], list]  # prepares the workspace, returns the command line
    words: tuple[str, ...]  # all in the Error line
    exit_code: int = 1  # 2: a click usage error (usage lines, then the Error line)
    prints_first: bool = False  # the command reported progress before it failed (train's first line)
    absent: tuple[str, ...] = ()  # never in the output


def case(run, *words, **options) -> Case:
    return Case(run, words, **options)


TRAIN_SMALL = ("--steps", "1", "--eval-every", "0", "--eval-batches", "1", "--batch-size", "2", "--context", "8",
               "--d-model", "32", "--layers", "1", "--heads", "4", "--no-progress")


def train(ws, *args):
    return ["train", "bgpt", "--data", ws / "data", "--steps", "1", *args]


def disk_full_train(ws):
    ws.monkeypatch.setattr("bytedeploy.checkpoint.save_file", full_disk_save_file)
    return ["train", "bgpt", "--data", ws / "data", *TRAIN_SMALL, "--force", "-o", ws / "bgpt"]


def disk_full_export(ws):
    ws.monkeypatch.setattr(torch.onnx, "export", full_disk_onnx_export)
    return ["export", ws / "bgpt", "-o", ws / "bgpt-bundle", "--force"]


def export_clash(ws):
    """A file the old manifest does not list (so not the old export's) where the new export writes one."""
    edit_manifest(ws / "bgpt-bundle", lambda d: d["files"].pop("onnx/byte_patch.onnx"), reseal=True)
    return ["export", ws / "bgpt", "-o", ws / "bgpt-bundle", "--force"]


def on_bundle(spoil, name="bgpt-bundle", **generate_options):
    """A case that spoils a copy of a bundle, then runs generate on it."""
    def run(ws):
        spoil(ws / name)
        options = [x for k, v in generate_options.items() for x in (f"--{k.replace('_', '-')}", v)]
        return ["generate", ws / name, "--max-new", "4", *options, "-o", ws / "out.txt"]
    return run


def verify_on(spoil):
    def run(ws):
        spoil(ws / "bgpt-bundle")
        return ["verify", ws / "bgpt", ws / "bgpt-bundle"]
    return run


def corrupt_config(ws):
    (ws / "bgpt" / "config.json").write_text("{not json")


def config_edit(**changes):
    def run(ws):
        doc = json.loads((ws / "bgpt" / "config.json").read_text())
        for key, value in changes.items():
            if key == "n_embd":
                doc["model_config"]["n_embd"] = value
            else:
                doc[key] = value
        (ws / "bgpt" / "config.json").write_text(json.dumps(doc))
    return run


def truncate_weights(ws):
    weights = ws / "bgpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def then(prepare, command):
    def run(ws):
        prepare(ws)
        return command(ws)
    return run


BUNDLE_EDITS = {  # spoil(bundle) -> words; each runs through generate and verify
    "from another version": (by_hand(lambda d: d.update(bytedeploy_version="0.0.1")),
                             ("written by bytedeploy 0.0.1", "export it again")),
    "a graph file missing": (lambda b: (b / "onnx" / "byte_patch.onnx").unlink(), ("missing onnx/byte_patch.onnx",)),
    "a graph file edited": (lambda b: append_byte(b / "onnx" / "patch_decode.onnx"),
                            ("onnx/patch_decode.onnx", "sha256 mismatch")),
    "bundle.json edited by hand": (by_hand(lambda d: d.update(opset=19)), ("bundle.json was edited after export",)),
    "opset too old": (resealed(lambda d: d.update(opset=17)), ("opset 17", "opset 18 or newer")),
    "an unknown bytedeploy op": (resealed(lambda d: graph(d, "byte_patch").update(custom_ops=["bytedeploy::Nope"])),
                                 ("byte_patch", "'bytedeploy::Nope'")),
    "a foreign custom op": (resealed(lambda d: graph(d, "byte_patch").update(custom_ops=["foo::Bar"])),
                            ("'foo::Bar'", "does not implement")),
    "an unknown precision": (resealed(lambda d: d.update(precision="fp8")), ("precision 'fp8'",)),
    "a model config that is not a mapping": (resealed(lambda d: d.update(model_config=[1, 2])), ("model_config",)),
    "an unknown family": (resealed(lambda d: d.update(family="gpt5")), ("unknown model family",)),
    "a graph file left out of the file list": (resealed(lambda d: d["files"].pop("onnx/byte_patch.onnx")),
                                               ("byte_patch", "not in the manifest")),
}

CASES: dict[str, Case] = {
    # --- train: data
    "train: data path missing": case(lambda ws: train(ws, "--data", ws / "nope", "-o", ws / "out"),
                                     "data path not found"),
    "train: data folder empty": case(lambda ws: train(ws, "--data", ws / "empty", "-o", ws / "out"), "no files found"),
    "train: data is a file": case(lambda ws: train(ws, "--data", ws / "a_file", "-o", ws / "out"), "not a folder"),
    "train: every data file empty": case(lambda ws: train(ws, "--data", ws / "empty-files", "-o", ws / "out"),
                                         "every file under", "is empty (3 files)"),
    "train: conversion without pairs": case(lambda ws: train(ws, "--conversion", "abc->mid", "-o", ws / "out"),
                                            "no file pairs"),
    # --- train: model options
    "train: unknown family": case(lambda ws: ["train", "gpt5", "-o", ws / "out"], "unknown model family 'gpt5'"),
    "train: unknown --set field": case(lambda ws: train(ws, "--set", "n_foo=3", "-o", ws / "out"),
                                       "unknown model option 'n_foo'"),
    "train: --set value of the wrong type": case(lambda ws: train(ws, "--set", "n_layer=x", "-o", ws / "out"),
                                                 "cannot read 'x' as int"),
    "train: unknown preset": case(lambda ws: train(ws, "--preset", "huge", "-o", ws / "out"), "unknown preset 'huge'"),
    "train: context too short": case(lambda ws: train(ws, "--context", "2", "-o", ws / "out"), "n_patches >= 3"),
    "train: width the heads do not divide": case(lambda ws: train(ws, "--d-model", "30", "-o", ws / "out"),
                                                 "must divide"),
    "train: --steps 0": case(lambda ws: train(ws, "--steps", "0", "-o", ws / "out"), "steps must be >= 1"),
    # --- train: outputs
    "train: into an existing checkpoint": case(lambda ws: train(ws, "-o", ws / "bgpt"), "already exists; use --resume"),
    "train: --force over a folder that is not a checkpoint": case(
        lambda ws: train(ws, "--force", "-o", ws / "notes"), "not a bytedeploy checkpoint"),
    "train: -o a file": case(lambda ws: train(ws, "-o", ws / "a_file"), "is a file, not a checkpoint folder"),
    "train: -o inside a file": case(lambda ws: train(ws, "-o", ws / "a_file" / "run"), "is a file, not a folder"),
    "train: --resume of a checkpoint that holds no run": case(
        then(resume_state_without_run, lambda ws: ["train", "bgpt", "--resume", "-o", ws / "bgpt"]),
        "holds no training run to resume (no train_config", "--init"),
    "train: --resume without a training state": case(lambda ws: ["train", "bgpt", "--resume", "-o", ws / "bgpt"],
                                                     "cannot resume training"),
    "train --force: the disk fills at the save": case(disk_full_train, DISK_FULL, "is as it was", prints_first=True),
    # --- generate
    "generate: prompt over the model's limit": case(
        lambda ws: ["generate", ws / "bgpt", "--prompt", "x" * (bgpt.Config(**SMALL_BGPT).max_bytes + 1)],
        "prompt of 81 bytes exceeds the model's limit of 80 bytes"),
    "generate: --input not found": case(lambda ws: ["generate", ws / "bgpt", "--input", ws / "nope.abc", "--to", "mid"],
                                        "not found"),
    "generate: --to without --input": case(lambda ws: ["generate", ws / "bgpt", "--to", "mid"],
                                           "--to needs --input"),
    "generate: conversion on a bGPT not trained for it": case(
        lambda ws: ["generate", ws / "bgpt", "--input", ws / "tune.abc", "--to", "mid", "-o", ws / "tune.mid"],
        "not trained for conversion", "cannot convert .abc to .mid"),
    "generate: conversion on a bundle of a bGPT not trained for it": case(
        lambda ws: ["generate", ws / "bgpt-bundle", "--input", ws / "tune.abc", "--to", "mid"],
        "not trained for conversion"),
    "generate: conversion on a char-gpt2": case(
        lambda ws: ["generate", ws / "char", "--input", ws / "tune.abc", "--to", "mid"],
        "convert files with a bgpt model; this is a char-gpt2 model"),
    "generate: prompt bytes that are not UTF-8, on a text model": case(
        lambda ws: ["generate", ws / "char", "--prompt", "ab\udcff", "--max-new", "2"],
        "the prompt is not valid UTF-8: byte 0xff at offset 2"),
    "generate: a prompt character that is not text": case(lambda ws: ["generate", ws / "bgpt", "--prompt", "a\ud800"],
                                                         "--prompt holds U+D800"),
    "generate: --max-new over the limit": case(lambda ws: ["generate", ws / "char", "--max-new", "100000000"],
                                               "--max-new 100000000 is over the limit of 65,536"),
    "generate: --max-new not a number": case(lambda ws: ["generate", ws / "bgpt", "--max-new", "lots"],
                                             "Invalid value for '--max-new'", exit_code=2),
    "generate: onto an existing file": case(
        lambda ws: ["generate", ws / "bgpt", "--max-new", "4", "-o", ws / "a_file"], "exists; use --force"),
    "generate: -o inside a file": case(lambda ws: ["generate", ws / "bgpt", "-o", ws / "a_file" / "x.txt"],
                                       "is a file, not a folder"),
    "generate: unknown device": case(lambda ws: ["generate", ws / "bgpt", "--device", "foo"], "unknown device 'foo'"),
    "generate: native without a GPU": case(then(no_cuda, lambda ws: ["generate", ws / "bgpt", "--backend", "native"]),
                                           "the native backend needs a CUDA GPU"),
    "generate: a backend the family lacks": case(lambda ws: ["generate", ws / "bgpt", "--backend", "burst"],
                                                 "bgpt has no backend 'burst'; available: eager-reference, eager"),
    # --- checkpoints
    "generate: checkpoint missing": case(lambda ws: ["generate", ws / "nope"], "checkpoint not found"),
    "eval: a file, not a checkpoint": case(lambda ws: ["eval", ws / "bgpt" / "config.json"],
                                           "not a bytedeploy checkpoint"),
    "generate: config.json not JSON": case(then(corrupt_config, lambda ws: ["generate", ws / "bgpt"]),
                                           "corrupt checkpoint config"),
    "eval: unknown family in config.json": case(then(config_edit(family="gpt5"), lambda ws: ["eval", ws / "bgpt"]),
                                                "unknown model family 'gpt5'"),
    "generate: config that does not fit the weights": case(
        then(config_edit(n_embd=64), lambda ws: ["generate", ws / "bgpt"]), "do not match the model"),
    "generate: truncated weights": case(then(truncate_weights, lambda ws: ["generate", ws / "bgpt"]),
                                        "corrupt weights"),
    "eval: truncated weights": case(then(truncate_weights, lambda ws: ["eval", ws / "bgpt"]), "corrupt weights"),
    # --- eval
    "eval: --batch-size 0": case(lambda ws: ["eval", ws / "bgpt", "--batch-size", "0"], "must be >= 1"),
    "eval: --batches 0": case(lambda ws: ["eval", ws / "bgpt", "--batches", "0"], "must be >= 1"),
    "eval: --batches -1": case(lambda ws: ["eval", ws / "bgpt", "--batches", "-1"], "must be >= 1"),
    # --- import
    "import: weights missing": case(lambda ws: ["import", "bgpt", ws / "nope.pth", "-o", ws / "imported"],
                                    "bGPT weights not found"),
    "import: not a PyTorch file": case(lambda ws: ["import", "bgpt", ws / "a_file", "-o", ws / "imported"],
                                       "cannot read bGPT weights", absent=("weights_only",)),
    "import: a pickle of other objects": case(
        lambda ws: ["import", "bgpt", pickled_path_object(ws / "w.pth"), "-o", ws / "imported"],
        "never unpickled", absent=("weights_only",)),
    "import: not the official bGPT's weights": case(
        then(lambda ws: torch.save({"model": {"foo": torch.zeros(2)}}, ws / "w.pth"),
             lambda ws: ["import", "bgpt", ws / "w.pth", "-o", ws / "imported"]), "not an official bGPT checkpoint"),
    "import: a head count that does not divide the width": case(
        lambda ws: ["import", "bgpt", official_weights(ws / "w.pth", 32), "-o", ws / "imported", "--n-head", "5",
                    "--byte-n-head", "4"], "must divide"),
    "import: width under 64 without head counts": case(
        lambda ws: ["import", "bgpt", official_weights(ws / "w.pth", 32), "-o", ws / "imported"],
        "hidden size 32 is under 64", "--n-head"),
    "import: onto an existing checkpoint": case(
        lambda ws: ["import", "bgpt", official_weights(ws / "w.pth", 128), "-o", ws / "bgpt"], "already exists"),
    # --- tokenizer
    "tokenizer train: -o an existing file that is not a .model": case(
        lambda ws: ["tokenizer", "train", "--data", ws / "data", "-o", ws / "a_file"], "exists: -o takes"),
    "tokenizer train: --eval-split out of range": case(
        lambda ws: ["tokenizer", "train", "--eval-split", "2", "-o", ws / "tok"], "Invalid value for '--eval-split'",
        exit_code=2),
    # --- bench
    "bench: --out exists": case(lambda ws: ["bench", ws / "bgpt", "--out", ws / "a_file"], "exists; use --force"),
    "bench: --plot inside a file": case(lambda ws: ["bench", ws / "bgpt", "--plot", ws / "a_file" / "p.png"],
                                        "is a file, not a folder"),
    "bench: unknown device": case(lambda ws: ["bench", ws / "bgpt", "--device", "foo"], "unknown device 'foo'"),
    "bench: --max-new past sigma-GPT's context": case(
        lambda ws: ["bench", ws / "sigma", "--max-new", "256", "--device", "cpu"],
        "--max-new 256 does not fit this sigma-gpt model", "room for 16 new tokens"),
    "bench: --max-new over the limit": case(lambda ws: ["bench", ws / "bgpt", "--max-new", "100000000"],
                                            "--max-new must be in 1..65536"),
    # --- export
    "export: opset newer than torch writes": case(lambda ws: ["export", ws / "bgpt", "-o", ws / "b", "--opset", "99"],
                                                  "opset 99 is newer"),
    "export: checkpoint missing": case(lambda ws: ["export", ws / "nope", "-o", ws / "b"], "checkpoint not found"),
    "export: into a folder that is not a bundle": case(lambda ws: ["export", ws / "bgpt", "-o", ws / "notes"],
                                                       "is not a bundle"),
    "export --force: into a folder that is not a bundle": case(
        lambda ws: ["export", ws / "bgpt", "-o", ws / "notes", "--force"], "is not a bundle"),
    "export: over a bundle without --force": case(lambda ws: ["export", ws / "bgpt", "-o", ws / "bgpt-bundle"],
                                                  "exists; pass --force"),
    "export --force: the disk fills": case(disk_full_export, "cannot write the bundle", DISK_FULL, "is as it was"),
    "export --force: a user's file where the new export writes": case(export_clash, "is not part of the old bundle"),
    # --- bundles: not one
    "generate: bundle.json of something else": case(
        then(lambda ws: (ws / "notes" / "bundle.json").write_text('{"format": "something else"}'),
             lambda ws: ["generate", ws / "notes"]), "not a bytedeploy bundle"),
    # --- bundles: bundle.json edited after export (block_size raised: ONNX Runtime's Gather out of bounds before)
    "bundle: block_size raised by hand, then a long prompt": case(
        on_bundle(by_hand(raise_block_size), "char-bundle", prompt="x" * 40), "bundle.json was edited after export"),
    "bundle: n_layer edited by hand": case(on_bundle(by_hand(set_n_layer)), "bundle.json was edited after export"),
    "bundle: n_layer edited, digest rewritten": case(on_bundle(resealed(set_n_layer)),
                                                     "model_config says n_layer = 2", "present_k"),
    "bundle: an input renamed by hand": case(on_bundle(by_hand(rename_input)), "bundle.json was edited after export"),
    "bundle: an input renamed, digest rewritten": case(on_bundle(resealed(rename_input)),
                                                       "'byte_patch_greedy' inputs are", "'forced'", "'forced_bytes'"),
    "bundle: precision edited by hand": case(on_bundle(by_hand(set_fp16)), "bundle.json was edited after export"),
    "bundle: precision edited, digest rewritten": case(on_bundle(resealed(set_fp16)),
                                                       "precision is fp16", "computes in float32"),
    "bundle: vocab_size edited by hand": case(on_bundle(by_hand(set_vocab), "char-bundle"),
                                              "bundle.json was edited after export"),
    "bundle: vocab_size edited, digest rewritten": case(on_bundle(resealed(set_vocab), "char-bundle"),
                                                        "model_config says vocab_size", "logits"),
    "bundle: a graph the loop needs left out": case(on_bundle(resealed(lambda d: d["graphs"].pop(2))),
                                                    "no graph 'byte_patch_greedy'",
                                                    "it has patch_prefill, patch_decode, byte_patch"),
    # --- bundles: paths out of the folder (each resealed: the digest is no signature, these checks stand alone)
    "bundle: a file listed as ../../elsewhere": case(
        on_bundle(resealed(lambda d: d["files"].update({"../../outside/secret.bin": "0" * 64}))),
        "'../../outside/secret.bin' is not a relative path inside the bundle folder"),
    "bundle: a file listed by absolute path": case(
        on_bundle(resealed(lambda d: d["files"].update({"/etc/hostname": "0" * 64}))), "'/etc/hostname' is not"),
    "bundle: a graph file outside": case(
        on_bundle(resealed(lambda d: graph(d, "byte_patch").update(file="../outside/byte_patch.onnx"))),
        "graph 'byte_patch' file '../outside/byte_patch.onnx' is not a relative path inside"),
    "bundle: a graph name that is a path": case(
        on_bundle(resealed(lambda d: graph(d, "byte_patch").update(name="../../x"))), "'../../x' is not a plain name"),
    "bundle: a graph file symlinked outside": case(on_bundle(link_graph_outside), "onnx/byte_patch.onnx leads outside"),
    "bundle: assets symlinked outside": case(on_bundle(link_assets_outside), "assets leads outside"),
    "bundle: an engine symlinked outside": case(on_bundle(link_engine_outside),
                                                "engines/byte_patch.engine leads outside"),
    "bundle: external data outside": case(on_bundle(external_data_outside),
                                          "keeps weights at '../../outside/secret.bin', outside the bundle folder"),
}
for _name, (_spoil, _words) in BUNDLE_EDITS.items():
    CASES[f"bundle, generate: {_name}"] = Case(on_bundle(_spoil), _words)
    CASES[f"bundle, verify: {_name}"] = Case(verify_on(_spoil), _words)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line_and_changes_nothing(name, pristine, tmp_path, monkeypatch):
    c = CASES[name]
    ws = Workspace(tmp_path / "ws", monkeypatch)
    shutil.copytree(pristine, ws.root, symlinks=True)
    args = [str(a) for a in c.run(ws)]
    before = snapshot(ws.root)
    result = CliRunner().invoke(cli, args)
    monkeypatch.undo()
    assert result.exit_code == c.exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # click's exit, not a crash
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    if c.exit_code == 2:
        assert lines[0].startswith("Usage: "), result.output
    elif not c.prints_first:
        assert len(lines) == 1, result.output
    for word in c.words:
        assert word in errors[0], errors[0]
    for word in c.absent:
        assert word not in result.output
    assert snapshot(ws.root) == before


# ------------------------------------------------------------------------------------------------ now accepted


def invoke_ok(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_prompt_bytes_that_are_not_utf8_reach_bgpt_as_typed(pristine, tmp_path):
    """Python hands such argv bytes over as surrogate escapes; bGPT continues the very bytes (as --prompt-file)."""
    (tmp_path / "prompt.bin").write_bytes(b"ab\xff")
    common = ("--max-new", 8, "--temperature", 0)
    invoke_ok("generate", pristine / "bgpt", "--prompt", "ab\udcff", *common, "-o", tmp_path / "a.bin")
    invoke_ok("generate", pristine / "bgpt", "--prompt-file", tmp_path / "prompt.bin", "--ext", "txt", *common,
              "-o", tmp_path / "b.bin")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    invoke_ok("generate", pristine / "bgpt", "--prompt", "ab", *common, "-o", tmp_path / "c.bin")
    assert (tmp_path / "a.bin").read_bytes() != (tmp_path / "c.bin").read_bytes()  # the 0xff byte was seen


def test_export_force_keeps_the_files_export_did_not_write(pristine, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(pristine / "bgpt-bundle", bundle)
    (bundle / "notes.txt").write_text("mine")
    (bundle / "engines").mkdir()
    (bundle / "engines" / "byte_patch.engine").write_bytes(b"an engine")
    edit_manifest(bundle, lambda d: d["extra"].update(marker=1), reseal=True)  # tells the old manifest from the new
    invoke_ok("export", pristine / "bgpt", "-o", bundle, "--force")
    assert (bundle / "notes.txt").read_text() == "mine"
    assert (bundle / "engines" / "byte_patch.engine").read_bytes() == b"an engine"
    loaded = load_bundle(bundle)
    assert "marker" not in loaded.extra and "notes.txt" not in loaded.files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging folder left


def test_bench_default_max_new_is_what_the_context_holds(pristine, tmp_path):
    """The default 256 new tokens do not fit sigma-GPT's 16-token context: the default becomes 16, rows run."""
    out = tmp_path / "bench.json"
    invoke_ok("bench", pristine / "sigma", "--backends", "eager", "--batch-sizes", 1, "--repeats", 1, "--device", "cpu",
              "--out", out)
    result = json.loads(out.read_text())
    assert result["max_new"] == 16
    assert [r["status"] for r in result["rows"]] == ["ok"] and result["rows"][0]["new"] == 16


@pytest.mark.parametrize("trained, source, target, refused", [
    ({"conversion": "abc->mid"}, "tune.abc", "mid", None),
    ({"conversion": "abc->mid"}, "tune.mid", "abc", "trained for conversion 'abc->mid'"),
    ({"conversion": "wav&mp3"}, "a.mp3", "wav", None),
    ({"conversion": None}, "tune.abc", "mid", "not trained for conversion"),
    ({}, "tune.abc", "mid", None),  # imported weights: no record of their training, they may try
])
def test_conversion_is_refused_only_where_the_training_run_says_it_cannot_work(trained, source, target, refused):
    if refused is None:
        check_conversion("bgpt", trained, source, target)
    else:
        with pytest.raises(UserError, match=refused):
            check_conversion("bgpt", trained, source, target)


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_checkpoints_and_bundles_get_the_modes_the_umask_gives(pristine, tmp_path, umask, dir_mode, file_mode):
    """Not mkdtemp's 0700: another user can read them under the usual umask 022."""
    old = os.umask(umask)
    try:
        model, cfg = bgpt.Model(bgpt.Config(**SMALL_BGPT)), bgpt.Config(**SMALL_BGPT)
        ckpt = save_checkpoint(tmp_path / "ckpt", model, "bgpt", cfg, assets={"vocab.txt": b"a"})
        bundle = export(ckpt, tmp_path / "bundle").path
    finally:
        os.umask(old)
    for root in (ckpt, bundle):
        for p in [root, *root.rglob("*")]:
            assert stat.S_IMODE(p.stat().st_mode) == (dir_mode if p.is_dir() else file_mode), p


def test_generate_force_overwrites_an_existing_file(pristine, tmp_path):
    out = tmp_path / "sample.txt"
    out.write_bytes(b"precious")
    invoke_ok("generate", pristine / "bgpt", "--prompt", "a", "--max-new", 4, "--temperature", 0, "-o", out, "--force")
    assert out.read_bytes() != b"precious"


def test_ort_custom_ops_without_onnxruntime_extensions_is_one_line(tmp_path, monkeypatch):
    import sys

    from bytedeploy.runtimes.ort import make_session

    monkeypatch.delitem(sys.modules, "bytedeploy.plugins.ort_ops", raising=False)
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails as if not installed
    with pytest.raises(UserError) as e:
        make_session(tmp_path / "model.onnx", custom_ops=True)
    assert "\n" not in str(e.value) and "pip install onnxruntime-extensions" in str(e.value)
