"""bGPT (arXiv 2402.19155): a patch-level decoder over 16-byte patches and a byte-level decoder inside a patch.

File encoding: [BOS patch = extension bytes padded with 256] + [file bytes padded with 256 to a whole patch]
+ [EOS patch = 16 x 256], at most n_patches patches. The patch-level decoder embeds each patch as
Linear(one_hot(bytes, 257).flatten()) and runs a GPT-2 stack over patches. For target patch j (1..N-1) the
byte-level decoder (a GPT-2 LM over 257 symbols) reads [feature of patch j-1, bytes 0..14 of patch j] and predicts
bytes 0..15 of patch j.

Where we differ from the seed's training code (following the paper): the byte decoder is trained to predict the
first 256 of a patch (the end-of-content mark) so that generation learns where a file stops; bytes after that
first 256 are padding and carry no loss.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bytedeploy.data.files import (
    FileRecord,
    conversion_pairs,
    in_eval_split,
    label_of,
    load_records,
    read_folder,
    split_records,
)
from bytedeploy.errors import UserError
from bytedeploy.families.bgpt import N_SYMBOLS, SPECIAL, UNIT, Config, encode_file, patches_to_bytes, plan_generation
from bytedeploy.families.bgpt import PRESETS as PRESETS  # the registry's family interface (registry.py)
from bytedeploy.generation import GenerateRequest, GenerateResult
from bytedeploy.models.layers import GPT2Stack, GPT2StackConfig, init_gpt2_weights
from bytedeploy.models.sampling import make_generator, sample
from bytedeploy.sampling import SamplingConfig, sample_host

BACKENDS = ("eager-reference", "eager")
CLI_ALIASES = {"context": "n_patches"}  # --context counts patches per file, BOS and EOS included


# ----------------------------------------------------------------------------------------------- model


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        P, C = cfg.patch_size, cfg.n_embd
        self.patch_embedding = nn.Linear(P * N_SYMBOLS, C)
        self.patch_decoder = GPT2Stack(GPT2StackConfig(cfg.n_layer, cfg.n_head, C, cfg.n_patches, cfg.dropout))
        if cfg.task == "classify":
            self.classifier = nn.Linear(C, len(cfg.labels))
        else:
            # positions 0..P: the seed's byte decoder has P+1 positions, of which generation uses the first P
            self.byte_wte = nn.Embedding(N_SYMBOLS, C)
            self.byte_decoder = GPT2Stack(GPT2StackConfig(cfg.byte_n_layer, cfg.byte_n_head, C, P + 1, cfg.dropout))
            self.lm_head = nn.Linear(C, N_SYMBOLS, bias=False)
            self.lm_head.weight = self.byte_wte.weight  # tied, as in GPT2LMHeadModel
        init_gpt2_weights(self, cfg.n_layer)

    # -- the two decoders, each usable with or without a KV cache

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, P) bytes -> (B, N, C): Linear over the flattened one-hot, computed as an embedding-sum.

        Column p * 257 + s of the Linear's weight is the row of byte s at patch position p. F.embedding rather
        than advanced indexing: its backward is deterministic (and faster), so runs and resumes repeat exactly."""
        offsets = N_SYMBOLS * torch.arange(self.cfg.patch_size, device=patches.device)
        rows = F.embedding(patches + offsets, self.patch_embedding.weight.t())  # (B, N, P, C)
        return rows.sum(-2) + self.patch_embedding.bias

    def encode_patches(self, patches: torch.Tensor, caches=None, start: int = 0) -> torch.Tensor:
        """(B, N, P) -> patch features (B, N, C), the patch-level decoder's last hidden states."""
        return self.patch_decoder(self.embed_patches(patches), caches, start)

    def byte_logits(self, features: torch.Tensor, bytes_in: torch.Tensor, caches=None, start: int = 0):
        """Byte decoder over [feature, bytes_in...] written at positions start.. .

        features (M, C) or None (then the first position is a byte too); bytes_in (M, k) -> logits (M, T, 257)."""
        parts = [] if features is None else [features[:, None].to(self.byte_wte.weight.dtype)]
        if bytes_in.size(1):
            parts.append(self.byte_wte(bytes_in))
        h = self.byte_decoder(torch.cat(parts, 1), caches, start)
        return self.lm_head(h)

    # -- training

    def forward(self, batch: dict[str, torch.Tensor]):
        """-> (mean cross-entropy in nats, number of targets)."""
        patches, masks = batch["patches"], batch["masks"]
        feats = self.encode_patches(patches)
        if self.cfg.task == "classify":
            logits = self.classify_logits(feats, masks)
            return F.cross_entropy(logits, batch["labels"]), batch["labels"].numel()
        keep = masks[:, 1:].bool()
        src, tgt = feats[:, :-1][keep], patches[:, 1:][keep]  # (M, C), (M, P)
        k = self.cfg.patch_sampling_batch_size
        if self.training and 0 < k < src.size(0):
            idx = torch.randperm(src.size(0), device=src.device)[:k].sort().values
            src, tgt = src[idx], tgt[idx]
        logits = self.byte_logits(src, tgt[:, :-1])
        targets = tgt.masked_fill(after_first_special(tgt), -100)
        loss = F.cross_entropy(logits.reshape(-1, N_SYMBOLS).float(), targets.reshape(-1), ignore_index=-100)
        return loss, int((targets != -100).sum())

    def classify_logits(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        m = masks.to(feats.dtype)[..., None]
        return self.classifier((feats * m).sum(1) / m.sum(1).clamp(min=1))


def after_first_special(tgt: torch.Tensor) -> torch.Tensor:
    """True at positions after the first 256 of each row (padding that carries no loss)."""
    is_sp = (tgt == SPECIAL).long()
    return (is_sp.cumsum(-1) - is_sp) > 0


# ----------------------------------------------------------------------------------------------- data


class PatchData:
    """Encoded files for training: random batches for steps, fixed batches for eval."""

    unit = UNIT

    def __init__(self, train: list[np.ndarray], evals: list[np.ndarray], cfg: Config,
                 train_labels=None, eval_labels=None, note: str = ""):
        self.train, self.evals, self.cfg = train, evals, cfg
        self.train_labels, self.eval_labels = train_labels, eval_labels
        self.note = note

    def describe(self) -> str:
        return f"{len(self.train)} train / {len(self.evals)} eval files{self.note}"

    def train_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        idx = rng.integers(len(self.train), size=batch_size)
        return self._collate(idx, self.train, self.train_labels)

    def eval_batches(self, batch_size: int, max_batches: int):
        n = min(len(self.evals), batch_size * max_batches)
        for i in range(0, n, batch_size):
            yield self._collate(np.arange(i, min(i + batch_size, n)), self.evals, self.eval_labels)

    def _collate(self, idx, items, labels):
        n = max(len(items[i]) for i in idx)
        patches = np.full((len(idx), n, self.cfg.patch_size), SPECIAL, dtype=np.int64)
        masks = np.zeros((len(idx), n), dtype=np.int64)
        for row, i in enumerate(idx):
            patches[row, :len(items[i])] = items[i]
            masks[row, :len(items[i])] = 1
        batch = {"patches": torch.from_numpy(patches), "masks": torch.from_numpy(masks)}
        if labels is not None:
            batch["labels"] = torch.tensor([labels[i] for i in idx], dtype=torch.long)
        return batch


def make_data(cfg: Config, spec: str, options: dict) -> PatchData:
    """options: eval_split (0.05), eval_data (a folder), conversion ('abc->mid' / 'wav&mp3')."""
    records = load_records(spec)
    conversion = options.get("conversion")
    if conversion and cfg.task == "generate":
        return conversion_data(cfg, records, options, conversion)
    if options.get("eval_data"):
        train, evals = records, read_folder_records(options["eval_data"])
    else:
        train, evals = split_records(records, options.get("eval_split", 0.05))
    if cfg.task == "classify":
        index = {label: i for i, label in enumerate(cfg.labels)}
        unknown = sorted({label_of(r) for r in train + evals} - set(index))
        if unknown:
            raise UserError(f"files carry labels the model does not know: {unknown[:5]}")
        enc = [encode_file(r.data, r.ext, cfg, truncate=True) for r in train]
        ev = [encode_file(r.data, r.ext, cfg, truncate=True) for r in evals]
        data = PatchData(enc, ev, cfg, [index[label_of(r)] for r in train], [index[label_of(r)] for r in evals])
        data.unit = "file"  # the loss is one cross-entropy per file: report bits per file, not per byte
        return data
    too_long = sum(len(r.data) > cfg.max_bytes for r in train + evals)
    enc = [encode_file(r.data, r.ext, cfg, truncate=True) for r in train]
    ev = [encode_file(r.data, r.ext, cfg, truncate=True) for r in evals]
    note = f" ({too_long} longer than {cfg.max_bytes} bytes, truncated as in the seed)" if too_long else ""
    return PatchData(enc, ev, cfg, note=note)


def conversion_data(cfg: Config, records: list[FileRecord], options: dict, conversion: str) -> PatchData:
    """Pair the files first, then split the pairs by their shared name, so that a pair's two files never land on
    different sides of the train/eval split (a per-file split would lose those pairs)."""
    pairs = conversion_pairs(records, conversion)
    if options.get("eval_data"):
        train, evals = pairs, conversion_pairs(read_folder_records(options["eval_data"]), conversion)
    else:
        train, evals = split_pairs(pairs, options.get("eval_split", 0.05))
    enc = [encode_pair(a, b, cfg) for a, b in train]
    ev = [encode_pair(a, b, cfg) for a, b in evals]
    return PatchData(enc, ev, cfg, note=f" as {len(enc)} / {len(ev)} conversion pairs ({conversion})")


def split_pairs(pairs: list[tuple[FileRecord, FileRecord]], eval_fraction: float):
    """The deterministic split of bytedeploy.data.files, keyed on a pair's shared path without extension."""
    evals = [p for p in pairs if in_eval_split(p[0].stem, eval_fraction)]
    train = [p for p in pairs if not in_eval_split(p[0].stem, eval_fraction)]
    if not evals and eval_fraction > 0:  # tiny folders: hold out the pairs of one name
        stem = train[-1][0].stem
        evals, train = [p for p in train if p[0].stem == stem], [p for p in train if p[0].stem != stem]
    if not train:
        raise UserError("every conversion pair fell into the eval split; lower --eval-split or add files")
    return train, evals


def read_folder_records(path: str) -> list[FileRecord]:
    from pathlib import Path

    return read_folder(Path(path))


def encode_pair(src: FileRecord, dst: FileRecord, cfg: Config) -> np.ndarray:
    """A conversion training example: source without EOS, then the target file with its BOS and EOS."""
    src_part = encode_file(src.data, src.ext, cfg, eos=False, truncate=True)
    return np.concatenate([src_part, encode_file(dst.data, dst.ext, cfg, truncate=True)])[:cfg.n_patches]


def labels_from(spec: str) -> tuple[str, ...]:
    """Sorted class names of a labelled data source (file names label_xxx.ext)."""
    labels = sorted({label_of(r) for r in load_records(spec)})
    if len(labels) < 2:
        raise UserError(f"classification needs at least two labels in {spec} (file names label_xxx.ext); "
                        f"found {labels}")
    return tuple(labels)


# ----------------------------------------------------------------------------------------------- generation


def generate(model: Model, cfg: Config, request: GenerateRequest, backend: str = "eager") -> GenerateResult:
    if cfg.task != "generate":
        raise UserError("this checkpoint is a classifier; use 'bytedeploy eval' to classify files")
    if backend not in BACKENDS:
        raise UserError(f"bGPT has no backend {backend!r} here; choose from {', '.join(BACKENDS)}")
    patches, tail, max_patches = plan_generation(cfg, request)
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    if backend == "eager-reference":
        rng = np.random.default_rng(request.sampling.seed)
        outs = [generate_reference(model, patches, tail, max_patches, request.sampling, rng)
                for _ in range(request.batch_size)]
    else:
        outs = generate_cached(model, patches, tail, max_patches, request.sampling, request.batch_size)
    sync(device)
    seconds = time.perf_counter() - t0
    if request.max_new:
        outs = [o[:request.max_new] for o in outs]
    return GenerateResult(outs, sum(len(o) for o in outs), seconds, UNIT)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_reference(model: Model, prompt: np.ndarray, tail: np.ndarray, max_patches: int,
                       sampling: SamplingConfig, rng: np.random.Generator) -> bytes:
    """The seed's loop: for each new patch the whole patch decoder re-runs over every patch so far; for each byte
    the byte decoder re-runs over the whole prefix; probabilities go to the host and numpy samples."""
    device = next(model.parameters()).device
    P = model.cfg.patch_size
    patches = [p for p in prompt]
    new_bytes: list[int] = []
    tokens = [int(t) for t in tail]
    for _ in range(max_patches):
        feats = model.encode_patches(torch.tensor(np.stack(patches), device=device)[None])
        feature = feats[0, -1:]
        while True:
            logits = model.byte_logits(feature, torch.tensor([tokens], dtype=torch.long, device=device))
            probs = torch.softmax(logits[0, -1].float(), -1).cpu().numpy()
            token = sample_host(probs, sampling, rng)
            tokens.append(token)
            if token == SPECIAL or len(tokens) >= P:
                break
        new_bytes.extend(t for t in tokens[len(tail):] if t != SPECIAL)
        if SPECIAL in tokens:
            break
        patches.append(np.array(tokens, dtype=np.int64))
        tokens, tail = [], np.zeros(0, dtype=np.int64)
    return bytes(new_bytes)


@torch.no_grad()
def generate_cached(model: Model, prompt: np.ndarray, tail: np.ndarray, max_patches: int,
                    sampling: SamplingConfig, batch_size: int = 1) -> list[bytes]:
    """Our loop: KV caches in both decoders, sampling on the device, one host check per patch."""
    device = next(model.parameters()).device
    cfg = model.cfg
    gen = make_generator(sampling.seed, device)
    patch_caches = model.patch_decoder.make_caches(batch_size, cfg.n_patches)
    byte_caches = model.byte_decoder.make_caches(batch_size, cfg.patch_size)
    x = torch.tensor(prompt, device=device)[None].expand(batch_size, -1, -1)
    feature = model.encode_patches(x, patch_caches, 0)[:, -1]
    forced = torch.tensor(tail, dtype=torch.long, device=device)[None].expand(batch_size, -1)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    pos, out = len(prompt), []
    for _ in range(max_patches):
        patch = generate_patch(model, feature, forced, byte_caches, sampling, gen)
        patch[done] = SPECIAL
        out.append(patch[:, forced.size(1):])
        done |= (patch == SPECIAL).any(-1)
        if bool(done.all()) or pos + 1 >= cfg.n_patches:
            break
        feature = model.encode_patches(patch[:, None], patch_caches, pos)[:, -1]
        pos += 1
        forced = forced[:, :0]
    rows = torch.cat(out, 1).cpu().numpy()
    return [patches_to_bytes(r) for r in rows]


def generate_patch(model: Model, feature: torch.Tensor, forced: torch.Tensor, caches, sampling: SamplingConfig,
                   gen: torch.Generator) -> torch.Tensor:
    """One patch for every row: prefill [feature, forced bytes], then sample byte by byte with the byte
    decoder's KV cache. Rows that emitted 256 keep emitting 256 (padding), so no host check is needed."""
    P = model.cfg.patch_size
    B, k = forced.shape
    logits = model.byte_logits(feature, forced, caches, 0)[:, -1]
    seen = (forced == SPECIAL).any(-1)
    out = [forced]
    for i in range(k, P):
        token = sample(logits, sampling, gen)
        token = torch.where(seen, torch.full_like(token, SPECIAL), token)
        seen = seen | (token == SPECIAL)
        out.append(token[:, None])
        if i + 1 < P:
            logits = model.byte_logits(None, token[:, None], caches, i + 1)[:, -1]
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------------------------- importer


def import_official_state_dict(official: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """The official bGPT checkpoint's state dict (transformers GPT-2 names, Conv1D (in, out) weights) -> ours."""
    ours: dict[str, torch.Tensor] = {}
    prefixes = {"patch_level_decoder.base.": "patch_decoder.",
                "byte_level_decoder.base.transformer.": "byte_decoder."}
    for key, value in official.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers releases
        if key in ("patch_level_decoder.base.wte.weight",):
            continue  # the patch decoder's unused 1-token embedding
        if key.startswith("patch_level_decoder.patch_embedding."):
            ours[key.removeprefix("patch_level_decoder.")] = value
            continue
        if key == "byte_level_decoder.base.transformer.wte.weight":
            ours["byte_wte.weight"] = value
            continue
        if key == "byte_level_decoder.base.lm_head.weight":
            ours["lm_head.weight"] = value
            continue
        for theirs, mine in prefixes.items():
            if key.startswith(theirs):
                name = mine + key.removeprefix(theirs)
                conv1d = any(name.endswith(f"{m}.weight") for m in ("c_attn", "c_proj", "c_fc"))
                ours[name] = value.t().contiguous() if conv1d else value
                break
        else:
            raise UserError(f"unexpected key in the official bGPT checkpoint: {key}")
    ours.setdefault("lm_head.weight", ours.get("byte_wte.weight"))
    return ours


def config_from_official(official: dict[str, torch.Tensor], n_head: int | None = None,
                         byte_n_head: int | None = None) -> Config:
    """Read the architecture off the tensor shapes. Head counts are not in the shapes: the official code always uses
    hidden size / 64 for both decoders (12 for the paper's 768), the default here."""
    try:
        C, flat = official["patch_level_decoder.patch_embedding.weight"].shape
        n_patches = official["patch_level_decoder.base.wpe.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"not an official bGPT checkpoint: no {e.args[0]}") from None
    except (AttributeError, ValueError, IndexError, TypeError):
        raise UserError("not an official bGPT checkpoint: its patch embedding is not a 2-d tensor") from None
    def count(prefix):
        return len({k.split(".")[len(prefix.split(".")) - 1] for k in official if k.startswith(prefix)})
    n_head, byte_n_head = n_head or C // 64, byte_n_head or C // 64
    if n_head < 1 or byte_n_head < 1:
        raise UserError(f"cannot import these weights: hidden size {C} is under 64, so the official head count "
                        "(hidden size / 64) is 0; give --n-head and --byte-n-head")
    try:
        return Config(patch_size=flat // N_SYMBOLS, n_patches=n_patches, n_embd=C,
                      n_layer=count("patch_level_decoder.base.h."), n_head=n_head,
                      byte_n_layer=count("byte_level_decoder.base.transformer.h."), byte_n_head=byte_n_head)
    except ValueError as e:
        raise UserError(f"cannot import these weights: {e}") from None


def load_official(path: str, n_head: int | None = None, byte_n_head: int | None = None) -> tuple[Model, Config]:
    """Load weights saved by the official bGPT code (torch.save({'model': state_dict, ...})); head counts default to
    hidden size / 64, as there."""
    from bytedeploy.checkpoint import load_plain_torch_file, load_weights

    obj = load_plain_torch_file(path, "bGPT weights")
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds no state dict")
    cfg = config_from_official(state, n_head, byte_n_head)
    model = Model(cfg)
    load_weights(model, import_official_state_dict(state, cfg), source=path)
    return model.eval(), cfg
