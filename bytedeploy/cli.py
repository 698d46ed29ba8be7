"""The bytedeploy command line: train, generate, eval, data, import, demo."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import click

from bytedeploy.cli_common import argument_bytes, check_writable_parent
from bytedeploy.config import config_from_dict, config_to_dict, parse_overrides
from bytedeploy.deploy_cli import COMMANDS as DEPLOY_COMMANDS
from bytedeploy.errors import UserError
from bytedeploy.registry import get_family


class CLIGroup(click.Group):
    """Turns a UserError anywhere below into click's one-line 'Error: ...' and exit status 1, and so does a missing
    PyTorch in a command that needs it (a deploy install has none: pyproject.toml's train extra brings it)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except ModuleNotFoundError as e:
            if e.name != "torch":
                raise
            raise click.ClickException(f"{ctx.command_path} {ctx.invoked_subcommand or ''} needs PyTorch: "
                                       'pip install "bytedeploy[train]"') from None


@click.group(cls=CLIGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="bytedeploy")
def cli():
    """Train, sample and deploy new kinds of small language models (bGPT, BitNet, sigma-GPT, BFN, char GPT-2)."""


def check_family(ctx, param, name: str) -> str:
    get_family(name)  # an unknown name is a UserError: one line, like every other bad input
    return name


def family_argument():
    return click.argument("family", metavar="FAMILY", callback=check_family)


def sampling_options(f):
    opts = [
        click.option("--top-k", type=int, default=0, show_default=True,
                     help="Keep the k most likely tokens (0 = off)."),
        click.option("--top-p", type=float, default=1.0, show_default=True,
                     help="Keep the smallest set of tokens whose probability reaches p (1.0 = off)."),
        click.option("--temperature", type=float, default=1.0, show_default=True,
                     help="Divide the logits of the kept tokens by this; 0 = greedy (argmax)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler's random numbers."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="cpu, cuda, cuda:N, or auto (CUDA when PyTorch sees a GPU).")(f)


# ------------------------------------------------------------------------------------------------ train

ARCH_ALIASES = {"context": "block_size", "d_model": "n_embd", "layers": "n_layer", "heads": "n_head", "order": "order"}


def build_model_config(family, preset: str, overrides: dict):
    if preset not in family.PRESETS:
        raise UserError(f"unknown preset {preset!r}; known: {', '.join(family.PRESETS)}")
    values = dict(family.PRESETS[preset])
    values.update(overrides)
    return config_from_dict(family.Config, values, what="model config")


def arch_overrides(family, **values) -> dict:
    """--context/--d-model/--layers/--heads -> the family's own field names (CLI_ALIASES in the family)."""
    aliases = dict(ARCH_ALIASES, **getattr(family, "CLI_ALIASES", {}))
    fields = {f.name for f in dataclasses.fields(family.Config)}
    out = {}
    for option, value in values.items():
        if value is None:
            continue
        field = aliases[option]
        if field not in fields:
            raise UserError(f"--{option.replace('_', '-')} does not apply to this family")
        out[field] = value
    return out


@cli.command()
@family_argument()
@click.option("--data", "data_spec", default="builtin:stdlib", show_default=True,
              help="Training data: builtin:stdlib, builtin:cpu-states, or a folder of files (read recursively).")
@click.option("--eval-data", type=click.Path(), default=None,
              help="A folder of eval files; without it a deterministic --eval-split of --data is held out.")
@click.option("--eval-split", type=click.FloatRange(0.0, 0.9), default=0.05, show_default=True,
              help="Fraction of --data files held out for eval (chosen by a hash of each path).")
@click.option("--preset", default="tiny", show_default=True,
              help="Named model size (tiny runs on a CPU; base is the paper's).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override one model config field, e.g. --set n_layer=4 (repeatable).")
@click.option("--context", type=int, default=None, help="Context length (bGPT: patches per file).")
@click.option("--d-model", type=int, default=None, help="Hidden width.")
@click.option("--layers", type=int, default=None, help="Transformer layers.")
@click.option("--heads", type=int, default=None, help="Attention heads.")
@click.option("--task", type=click.Choice(["generate", "classify"]), default="generate", show_default=True,
              help="bGPT: generative modelling, or classification with labels from file names (label_xxx.ext).")
@click.option("--conversion", default=None,
              help="bGPT conversion pairs: 'abc->mid' one way, 'wav&mp3' both ways (paths differ only in extension).")
@click.option("--order", type=click.Choice(["shuffle", "left-to-right"]), default=None,
              help="sigma-GPT: train on shuffled orders or left to right [default: shuffle].")
@click.option("--tokenizer", type=click.Path(), default=None,
              help="Bayesian-flow LM: a sentencepiece model from 'bytedeploy tokenizer train' [default: train one].")
@click.option("--first-mb", type=float, default=None, help="Use only the first N megabytes of the data.")
@click.option("--init", "init_ckpt", type=click.Path(), default=None,
              help="Start from this checkpoint's weights (e.g. a generative bGPT before --task classify).")
@click.option("--steps", type=int, default=300, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences (files) per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate.")
@click.option("--warmup", type=int, default=20, show_default=True, help="Linear warmup steps before cosine decay.")
@click.option("--weight-decay", type=float, default=0.1, show_default=True, help="AdamW weight decay on matrices.")
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Clip the gradient norm (0 = off).")
@click.option("--eval-every", type=int, default=100, show_default=True, help="Eval every N steps (0 = start and end).")
@click.option("--eval-batches", type=int, default=8, show_default=True, help="Eval batches per evaluation.")
@click.option("--ckpt-every", type=int, default=100, show_default=True, help="Checkpoint every N steps (0 = end only).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for weights, batches and dropout.")
@device_option
@click.option("-o", "--out", type=click.Path(), default=None,
              help="Checkpoint folder [default: runs/FAMILY-PRESET].")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out exactly where it stopped.")
@click.option("--force", is_flag=True, help="Overwrite an existing checkpoint in --out.")
@click.option("--no-save", is_flag=True, help="Train and report, but write no checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(family, data_spec, eval_data, eval_split, preset, sets, context, d_model, layers, heads, task, conversion,
          order, tokenizer, first_mb, init_ckpt, steps, batch_size, grad_accum, lr, warmup, weight_decay, grad_clip,
          eval_every, eval_batches, ckpt_every, precision, seed, device, out, resume, force, no_save, no_progress):
    """Train a FAMILY model on built-in data or a folder of files, with checkpoints you can resume."""
    import tempfile

    from bytedeploy.checkpoint import check_replaceable, load_model, read_checkpoint, read_train_state
    from bytedeploy.training import TrainConfig, init_distributed, resolve_device
    from bytedeploy.training import train as run_training

    fam = get_family(family)
    out = Path(out or f"runs/{family}-{preset}")
    check_writable_parent(out)
    dist_info = init_distributed()
    dev = resolve_device(device, dist_info)
    resume_state = None
    data_options = {"eval_split": eval_split, "eval_data": eval_data, "conversion": conversion, "first_mb": first_mb,
                    "tokenizer": tokenizer}
    if resume:
        ckpt = read_checkpoint(out)
        if ckpt.family != family:
            raise UserError(f"{out} holds a {ckpt.family} checkpoint, not {family}")
        model, model_cfg, _ = load_model(out, "cpu")
        resume_state = read_train_state(out)
        missing = [k for k in ("train_config", "data", "data_options") if k not in ckpt.meta]
        if missing:
            raise UserError(f"{out} holds no training run to resume (no {missing[0]} in its config.json); "
                            f"start a new run from its weights with --init {out}")
        tcfg = config_from_dict(TrainConfig, dict(ckpt.meta["train_config"]), what="train config")
        if click.get_current_context().get_parameter_source("steps").name != "DEFAULT":
            tcfg = dataclasses.replace(tcfg, steps=steps)
        data_spec, data_options = ckpt.meta["data"], dict(ckpt.meta["data_options"], assets=str(ckpt.assets))
    else:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} is a file, not a checkpoint folder")
        if out.exists() and any(out.iterdir()) and not (force or no_save):
            raise UserError(f"{out} already exists; use --resume to continue it or --force to overwrite it")
        if not no_save:
            check_replaceable(out)  # --force replaces checkpoints only: say so now, not after loading the data
        overrides = arch_overrides(fam, context=context, d_model=d_model, layers=layers, heads=heads, order=order)
        overrides.update(parse_overrides(sets, fam.Config))
        if task != "generate":
            if not hasattr(fam, "labels_from"):
                raise UserError(f"{family} has no --task {task}")
            overrides.update(task=task, labels=fam.labels_from(data_spec))
        model_cfg = build_model_config(fam, preset, overrides)
        if hasattr(fam, "prepare_config"):
            model_cfg = fam.prepare_config(model_cfg, data_spec, data_options)
        tcfg = config_from_dict(TrainConfig, dict(
            steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
            weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every, eval_batches=eval_batches,
            ckpt_every=ckpt_every, seed=seed, precision=precision), what="training option")
        import torch

        torch.manual_seed(seed)
        model = fam.Model(model_cfg)
        if init_ckpt:
            load_init_weights(model, init_ckpt)
    data = fam.make_data(model_cfg, data_spec, data_options)
    n_params = sum(p.numel() for p in model.parameters())
    if dist_info.is_main:
        click.echo(f"{family} ({n_params / 1e6:.2f}M parameters) on {dev}; data {data_spec}: {data.describe()}")
    saved_options = {k: v for k, v in data_options.items() if k != "assets"}
    meta = {"data": data_spec, "data_options": saved_options, **getattr(data, "meta", {})}
    target = Path(tempfile.mkdtemp(prefix="bytedeploy-nosave-")) if no_save else out
    history = run_training(model, data, tcfg, target, family=family, model_config=model_cfg, device=dev, meta=meta,
                           assets=getattr(data, "assets", None), resume_state=resume_state, dist_info=dist_info,
                           progress=not no_progress)
    if dist_info.is_main:
        report_eval(fam, data, history)
        click.echo("checkpoint not saved (--no-save)" if no_save else f"checkpoint saved to {out}")
    if no_save:
        import shutil

        shutil.rmtree(target, ignore_errors=True)


def load_init_weights(model, path) -> None:
    """Copy every tensor whose name and shape match from a checkpoint (warm start)."""
    from bytedeploy.checkpoint import load_state_dict, read_checkpoint

    state = load_state_dict(read_checkpoint(path).path)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise UserError(f"no weights in {path} match this model")
    model.load_state_dict(matched, strict=False)
    click.echo(f"initialised {len(matched)} of {len(own)} tensors from {path}")


def report_eval(fam, data, history) -> None:
    first, last = history["eval"][0], history["eval"][-1]
    unit = getattr(data, "unit", "token")
    if getattr(fam, "LOSS_IS_NLL", True):
        click.echo(f"eval bits per {unit}: {first[1] / math.log(2):.4f} at step {first[0]} -> "
                   f"{last[1] / math.log(2):.4f} at step {last[0]}")
    else:
        click.echo(f"eval loss: {first[1]:.4f} at step {first[0]} -> {last[1]:.4f} at step {last[0]}")


# ------------------------------------------------------------------------------------------------ generate


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", default="", help="Text to continue (UTF-8).")
@click.option("--prompt-file", type=click.Path(), default=None, help="Continue the bytes of this file instead.")
@click.option("--ext", default=None, help="bGPT: extension of the file to generate (its BOS patch) [default: txt].")
@click.option("--input", "input_path", type=click.Path(), default=None,
              help="bGPT conversion: the file to convert (its extension is the source format).")
@click.option("--to", "target_ext", default=None, help="bGPT conversion: the extension to convert into.")
@click.option("--max-new", type=int, default=0, show_default=True,
              help="New tokens (bytes for bGPT) at most; 0 = the family's default.")
@click.option("-n", "--num-samples", type=int, default=1, show_default=True, help="Samples, generated as one batch.")
@sampling_options
@click.option("--backend", default="eager", show_default=True,
              help="For a checkpoint: eager-reference (the seed's loop: no KV cache, host sampling), eager "
                   "(KV cache, device sampling), burst (sigma-GPT), native (CUDA graphs, static caches, custom "
                   "kernels; needs a GPU: --device cuda), native+compile (bGPT). For an exported bundle: ort "
                   "(ONNX Runtime, CPU; the default), ort-cuda (onnxruntime-gpu), trt (built TensorRT engines), "
                   "burst (sigma-GPT burst sampling in ONNX Runtime).")
@click.option("--gen-order", type=click.Choice(["left-to-right", "random"]), default=None,
              help="sigma-GPT, eager and eager-reference backends: the order in which the new positions are "
                   "generated; random draws one order per sample from --seed [default: left-to-right].")
@click.option("--n-orders", type=click.IntRange(min=1), default=None,
              help="sigma-GPT, burst backend: random orders that score each pass's proposals; the longest "
                   "accepted run is kept (1 = exact random-order sampling, more = fewer passes) [default: 4].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Bayesian-flow LM (bfn): sampling steps [default: the model's n_steps].")
@click.option("--infill", default=None, metavar="TEMPLATE",
              help="Bayesian-flow LM (bfn): fill the holes of TEMPLATE, text with holes written [[N]] (N new "
                   "tokens), e.g. 'def [[4]](self): return [[8]]'; prints the whole filled text. Replaces --prompt.")
@device_option
@click.option("-o", "--out", type=click.Path(), default=None,
              help="Write samples here (a file for one sample, a folder for several) instead of printing them.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def generate(checkpoint, prompt, prompt_file, ext, input_path, target_ext, max_new, num_samples, top_k, top_p,
             temperature, seed, backend, gen_order, n_orders, steps, infill, device, out, force):
    """Sample from a trained CHECKPOINT or an exported bundle; prints the samples (or writes them with -o) and the
    speed."""
    from bytedeploy.generation import MAX_NEW, GenerateRequest
    from bytedeploy.runner import is_bundle, open_model
    from bytedeploy.sampling import SamplingConfig

    if num_samples < 1 or max_new < 0:
        raise UserError("--num-samples must be >= 1 and --max-new >= 0")
    if max_new > MAX_NEW:
        raise UserError(f"--max-new {max_new} is over the limit of {MAX_NEW:,} new tokens per call")
    if target_ext is not None and input_path is None:
        raise UserError("--to needs --input, the file to convert")
    if input_path is not None and not Path(input_path).is_file():
        raise UserError(f"input file not found: {input_path}")
    try:
        sampling = SamplingConfig(top_k, top_p, temperature, seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    prompt_bytes = argument_bytes(prompt, "--prompt")
    if prompt_file:
        if not Path(prompt_file).is_file():
            raise UserError(f"prompt file not found: {prompt_file}")
        prompt_bytes = Path(prompt_file).read_bytes()
    if is_bundle(checkpoint) and backend == "eager":  # the option's default names a checkpoint's backend
        backend = "ort"
    model = open_model(checkpoint, backend, device)
    family = model.family
    check_conversion(family, model.trained, input_path, target_ext)
    options = {"input": input_path, "target_ext": target_ext,
               **family_generate_options(family, backend, gen_order, n_orders, steps, infill)}
    if ext is not None:
        options["ext"] = ext
    elif prompt_file:
        options["ext"] = Path(prompt_file).suffix.lstrip(".") or "txt"
    request = GenerateRequest(prompt_bytes, max_new, num_samples, sampling, options)
    out_paths = planned_outputs(out, num_samples, target_ext or options.get("ext") or "txt", force)
    result = model.generate(request)
    for i, sample_bytes in enumerate(result.outputs):
        if out_paths:
            out_paths[i].parent.mkdir(parents=True, exist_ok=True)
            out_paths[i].write_bytes(sample_bytes)
        else:
            if num_samples > 1:
                click.echo(f"--- sample {i} ---")
            click.echo(sample_bytes.decode("utf-8", errors="replace"))
    passes = f", {result.passes / max(result.n_new, 1):.3f} passes per {result.unit}" if result.passes else ""
    click.echo(f"{model.label}: {result.n_new} {result.unit}s in {result.seconds:.2f} s "
               f"({result.per_second:,.1f} {result.unit}s/s{passes})"
               + (f"; wrote {', '.join(map(str, out_paths))}" if out_paths else ""), err=True)


def check_conversion(family: str, trained: dict, input_path, target_ext) -> None:
    """--input/--to ask a bGPT to convert a file: refuse it for another family, and for a bGPT whose training run
    (trained: the run's data options, or a bundle's extra) did not learn that conversion. Imported weights carry no
    record of their training ("conversion" absent): they may try."""
    from bytedeploy.data.files import parse_conversion

    if input_path is None:
        return
    if family != "bgpt":
        raise UserError(f"--input and --to convert files with a bgpt model; this is a {family} model")
    if target_ext is None or "conversion" not in trained:
        return
    mode, src = trained["conversion"], Path(input_path).suffix.lstrip(".")
    if not mode:
        raise UserError(f"this bgpt was not trained for conversion, so it cannot convert .{src} to .{target_ext} "
                        f"(train one with --conversion '{src}->{target_ext}')")
    if (src, target_ext) not in parse_conversion(mode):
        raise UserError(f"this bgpt was trained for conversion {mode!r}; it cannot convert .{src} to .{target_ext}")


def family_generate_options(family: str, backend: str, gen_order, n_orders, steps, infill) -> dict:
    """The family-specific generate flags -> request.options, refusing a flag that the family would ignore."""
    given = {"--gen-order": (gen_order, "sigma-gpt", "order"), "--n-orders": (n_orders, "sigma-gpt", "n_orders"),
             "--steps": (steps, "bfn", "n_steps"), "--infill": (infill, "bfn", "infill")}
    options = {}
    for flag, (value, owner, key) in given.items():
        if value is None:
            continue
        if family != owner:
            raise UserError(f"{flag} is a {owner} option; this is a {family} model")
        options[key] = value
    if n_orders is not None and backend != "burst":
        raise UserError("--n-orders applies to --backend burst")
    if gen_order is not None and backend == "burst":
        raise UserError("--gen-order applies to the eager backends; burst draws its own random orders")
    if infill is not None:
        from bytedeploy.families.bfn import parse_infill

        options["infill"] = parse_infill(infill)
    return options


def planned_outputs(out, n: int, ext: str, force: bool) -> list[Path]:
    if out is None:
        return []
    out = Path(out)
    paths = [out] if n == 1 else [out / f"sample_{i}.{ext}" for i in range(n)]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} exists; use --force to overwrite")
    if n == 1 and out.is_dir():
        raise UserError(f"{out} is a folder; give a file name for one sample")
    check_writable_parent(paths[0])
    return paths


# ------------------------------------------------------------------------------------------------ eval


@cli.command(name="eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", "data_spec", default=None,
              help="Data to evaluate on [default: the eval split of the checkpoint's training data].")
@click.option("--eval-split", type=click.FloatRange(0.0, 1.0), default=None,
              help="Held-out fraction of --data [default: the training run's].")
@click.option("--batches", type=int, default=50, show_default=True, help="Eval batches at most.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per eval batch.")
@device_option
def eval_cmd(checkpoint, data_spec, eval_split, batches, batch_size, device):
    """Report a CHECKPOINT's eval loss (bits per byte/token), or accuracy for a classifier."""
    import torch

    from bytedeploy.checkpoint import load_model
    from bytedeploy.training import TrainConfig, evaluate, resolve_device

    if batches < 1 or batch_size < 1:
        raise UserError("--batches and --batch-size must be >= 1")
    dev = resolve_device(device)
    model, cfg, ckpt = load_model(checkpoint, dev)
    fam = get_family(ckpt.family)
    options = dict(ckpt.meta.get("data_options", {}), assets=str(ckpt.assets))
    if data_spec:
        options.pop("eval_data", None)  # --data replaces the run's data, its --eval-data folder included
    if eval_split is not None:
        options["eval_split"] = eval_split
    spec = data_spec or ckpt.meta.get("data", "builtin:stdlib")
    if eval_split == 1.0:
        options["eval_data"] = spec  # all of it held out: a split would leave no training part and refuse
    data = fam.make_data(cfg, spec, options)
    tcfg = TrainConfig(eval_batches=batches, eval_batch_size=batch_size, precision="auto")
    loss = evaluate(model, data, tcfg, dev)
    unit = getattr(data, "unit", "token")
    line = f"{ckpt.family} on {spec}: eval loss {loss:.4f}"
    if getattr(fam, "LOSS_IS_NLL", True):
        line += f" nats = {loss / math.log(2):.4f} bits per {unit}"
    if getattr(cfg, "task", None) == "classify":
        correct = total = 0
        with torch.no_grad():
            for batch in data.eval_batches(batch_size, batches):
                batch = {k: v.to(dev) for k, v in batch.items()}
                pred = model.classify_logits(model.encode_patches(batch["patches"]), batch["masks"]).argmax(-1)
                correct += int((pred == batch["labels"]).sum())
                total += batch["labels"].numel()
        line += f"; accuracy {correct}/{total} = {100 * correct / max(total, 1):.2f}%"
    click.echo(line)


# ------------------------------------------------------------------------------------------------ data


@cli.group(cls=CLIGroup)
def data():
    """Built-in data sources and the bGPT CPU-state simulator."""


@data.command("info")
@click.argument("spec")
@click.option("--eval-split", type=click.FloatRange(0.0, 0.9), default=0.05, show_default=True,
              help="Held-out fraction, as train uses it.")
def data_info(spec, eval_split):
    """Count the files and bytes of a data SPEC (builtin:stdlib, builtin:cpu-states or a folder) and its split."""
    from bytedeploy.data.files import load_records, split_records

    records = load_records(spec)
    train_r, eval_r = split_records(records, eval_split)
    size = sum(len(r.data) for r in records)
    click.echo(f"{spec}: {len(records)} files, {size:,} bytes; split {len(train_r)} train / {len(eval_r)} eval")


def _mount_cpu_states():
    try:
        from bytedeploy.data.cpu_states import cpu_states_cli
    except ImportError:
        return
    data.add_command(cpu_states_cli, name="cpu-states")


_mount_cpu_states()


def _mount_tokenizer():
    from bytedeploy.data.sentencepiece_tokenizer import tokenizer_cli  # sentencepiece imports in a few ms

    cli.add_command(tokenizer_cli, name="tokenizer")


_mount_tokenizer()


# ------------------------------------------------------------------------------------------------ import


@cli.command(name="import")
@click.argument("family", type=click.Choice(["bgpt"]))
@click.argument("weights", type=click.Path())
@click.option("-o", "--out", type=click.Path(), required=True, help="Checkpoint folder to write.")
@click.option("--n-head", type=int, default=None,
              help="Patch-level decoder heads (not in the shapes) [default: hidden size / 64, as the official code].")
@click.option("--byte-n-head", type=int, default=None,
              help="Byte-level decoder heads [default: hidden size / 64, as the official code].")
@click.option("--force", is_flag=True, help="Overwrite an existing checkpoint in --out.")
def import_cmd(family, weights, out, n_head, byte_n_head, force):
    """Convert published weights (bGPT's weights-*.pth from the official code) into a bytedeploy checkpoint."""
    from bytedeploy.checkpoint import save_checkpoint
    from bytedeploy.models import bgpt

    if Path(out).exists() and not force:
        raise UserError(f"{out} already exists; use --force to overwrite it")
    model, cfg = bgpt.load_official(weights, n_head, byte_n_head)
    save_checkpoint(out, model, family, cfg, {"imported_from": str(weights)})
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"imported {weights} ({n / 1e6:.1f}M parameters, {config_to_dict(cfg)}) to {out}")


# ------------------------------------------------------------------------------------------------ demo


@cli.command()
@click.option("--steps", type=int, default=300, show_default=True, help="Training steps.")
@click.option("-o", "--out", type=click.Path(), default="runs/demo", show_default=True, help="Checkpoint folder.")
@click.option("--force", is_flag=True, help="Overwrite an earlier demo run.")
@device_option
def demo(steps, out, force, device):
    """Train a tiny bGPT on the Python standard library, report eval bits per byte, sample a .py file."""
    ctx = click.get_current_context()
    if Path(out).exists() and not force:
        raise UserError(f"{out} exists; use --force to run the demo again over it")
    ctx.invoke(train, family="bgpt", steps=steps, out=out, force=True, device=device, batch_size=16,
               eval_every=100, ckpt_every=100, lr=2e-3, eval_batches=8)
    sample_path = Path(out) / "sample.py"
    ctx.invoke(generate, checkpoint=out, prompt="import ", ext="py", top_k=40, temperature=0.8, seed=0,
               out=str(sample_path), force=True, device=device)
    text = sample_path.read_bytes().decode("utf-8", errors="replace")
    click.echo(f"--- {sample_path} (first 600 bytes) ---\n{text[:600]}")


for deploy_command in DEPLOY_COMMANDS:  # the deployment commands (deploy_cli.py)
    cli.add_command(deploy_command)


def main():
    cli(prog_name="bytedeploy")


if __name__ == "__main__":
    sys.exit(main())
