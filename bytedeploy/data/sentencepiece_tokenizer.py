"""Sentencepiece BPE tokenizers for the Bayesian-flow LM (the seed's tokenizer recipe).

The seed's settings: model_type bpe, bos 0, eos 1, pad 2, unk 3, the digits "0".."9" as user-defined symbols (so
every digit is its own piece). Added here so that source code round-trips: identity normalization, runs of spaces
kept and allowed as pieces (indentation), no dummy "▁" prefix, and newline and tab as user-defined symbols.

Training is quick and deterministic: at most max_mb megabytes of non-empty lines (every n-th line of the text, so
the sample spans the whole corpus), no shuffling, one thread. The model is written from memory (no .vocab file).

``bytedeploy tokenizer train`` (the ``tokenizer_cli`` group) trains one on a corpus; ``bytedeploy train bfn
--tokenizer FILE.model`` uses it.
"""

from __future__ import annotations

import io
from pathlib import Path

import click
import sentencepiece as spm

from bytedeploy.data.text import load_text_split
from bytedeploy.errors import UserError

SPECIAL_IDS = {"bos_id": 0, "eos_id": 1, "pad_id": 2, "unk_id": 3}
USER_SYMBOLS = [str(d) for d in range(10)] + ["\n", "\t"]
MIN_VOCAB = len(SPECIAL_IDS) + len(USER_SYMBOLS) + 1
TRAIN_MB = 2.0  # text that trains a tokenizer, at most
BUILTIN_DEFAULT_MB = 4.0  # builtin:stdlib without --first-mb (as the Bayesian-flow LM reads it)


def training_lines(text: str, max_mb: float = TRAIN_MB) -> list[str]:
    """Non-empty lines of text; every n-th one when they hold more than max_mb megabytes."""
    lines = [line for line in text.splitlines() if line.strip()]
    total = sum(len(line.encode("utf-8")) for line in lines)
    stride = max(1, -(-total // int(max_mb * 1e6)))
    return lines[::stride]


def sentencepiece_model_bytes(text: str, vocab_size: int, max_mb: float = TRAIN_MB) -> bytes:
    """Train a BPE model on text -> the serialized model (what a .model file holds)."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocabulary size {vocab_size} is too small: the special and user-defined pieces alone "
                        f"take {MIN_VOCAB - 1}; use at least {MIN_VOCAB}")
    lines = training_lines(text, max_mb)
    if not lines:
        raise UserError("no text to train the tokenizer on")
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, model_type="bpe", vocab_size=vocab_size,
            user_defined_symbols=USER_SYMBOLS, **SPECIAL_IDS,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        # "INTERNAL: src/trainer_interface.cc(744) [check] Vocabulary size too high (5000). ..." -> the sentence
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1].rsplit("] ", 1)[-1]
        raise UserError(f"sentencepiece cannot train a {vocab_size}-piece tokenizer on this text: {reason}") from None
    return out.getvalue()


def model_path(out_path: str | Path) -> Path:
    """A model prefix (runs/tok) or a path (runs/tok.model) -> the .model path."""
    out_path = Path(out_path)
    return out_path if out_path.suffix == ".model" else out_path.with_name(out_path.name + ".model")


def train_sentencepiece(text: str, vocab_size: int, out_path: str | Path, max_mb: float = TRAIN_MB) -> Path:
    """Train a BPE model on text and write it to out_path (".model" appended to a prefix) -> that path."""
    path = model_path(out_path)
    data = sentencepiece_model_bytes(text, vocab_size, max_mb)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_model_file(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    return path.read_bytes()


def load_sentencepiece(path_or_bytes: str | Path | bytes) -> spm.SentencePieceProcessor:
    """A .model file or its bytes -> a SentencePieceProcessor (UserError when it is not a sentencepiece model)."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else read_model_file(path_or_bytes)
    source = "tokenizer bytes" if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError:
        raise UserError(f"not a sentencepiece model: {source}") from None


def load_training_text(spec: str, first_mb: float | None = None, eval_split: float = 0.05) -> str:
    """The train split of a corpus (the eval split stays unseen by the tokenizer too)."""
    if first_mb is None and spec == "builtin:stdlib":
        first_mb = BUILTIN_DEFAULT_MB
    if first_mb is not None and first_mb <= 0:
        raise UserError(f"--first-mb must be > 0, got {first_mb}")
    return load_text_split(spec, eval_split, first_mb)[0]


# ----------------------------------------------------------------------------------------------- CLI


@click.group(name="tokenizer")
def tokenizer_cli():
    """Sentencepiece BPE tokenizers for the Bayesian-flow LM (bfn)."""


@tokenizer_cli.command("train")
@click.option("--data", "data_spec", default="builtin:stdlib", show_default=True,
              help="Text corpus: builtin:stdlib, a UTF-8 text file, or a folder of text files.")
@click.option("--vocab-size", type=int, default=512, show_default=True, help="Pieces in the vocabulary.")
@click.option("--first-mb", type=float, default=None,
              help=f"Use only the first N megabytes of the data [builtin:stdlib: {BUILTIN_DEFAULT_MB:g}].")
@click.option("--eval-split", type=click.FloatRange(0.0, 0.9), default=0.05, show_default=True,
              help="Held-out fraction of the data, as 'bytedeploy train' splits it; the tokenizer never sees it.")
@click.option("-o", "--out", required=True, type=click.Path(),
              help="Model path (FILE.model) or prefix (FILE, written as FILE.model).")
@click.option("--force", is_flag=True, help="Overwrite an existing model file.")
def train_cmd(data_spec, vocab_size, first_mb, eval_split, out, force):
    """Train a BPE tokenizer (bos 0, eos 1, pad 2, unk 3, one piece per digit) on a corpus."""
    try:
        path = model_path(out)
        if path != Path(out) and Path(out).exists():
            raise UserError(f"{out} exists: -o takes the model's path (FILE.model) or a prefix that names no file "
                            "(FILE, written as FILE.model)")
        if path.exists() and not force:
            raise UserError(f"{path} exists; use --force to overwrite it")
        text = load_training_text(data_spec, first_mb, eval_split)
        path = train_sentencepiece(text, vocab_size, path)
        sp = load_sentencepiece(path)
    except UserError as e:
        raise click.ClickException(str(e)) from None
    used = sum(len(line.encode("utf-8")) for line in training_lines(text))
    click.echo(f"trained a {sp.vocab_size()}-piece BPE tokenizer on {used / 1e6:.2f} MB of {data_spec}: {path}")
