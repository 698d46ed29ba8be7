"""Deployment commands: export (checkpoint -> bundle), verify (numerics across backends), build (TensorRT engines).

Mounted on the main ``bytedeploy`` group by cli.py; imports nothing from it (shared helpers: cli_common.py).
"""

from __future__ import annotations

from pathlib import Path

import click

from bytedeploy.runtimes.targets import TARGETS
from bytedeploy.serve.command import serve
from bytedeploy.verify import tolerance_help


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", type=click.Path(), required=True, help="Bundle folder to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Floating-point type of the graphs' weights and activations.")
@click.option("--bitlinear", type=click.Choice(["qdq", "plugin"]), default=None,
              help="BitNet only: 'qdq' = standard ONNX ops (2-bit weights as INT2/INT4 initializers with "
                   "DequantizeLinear), any runtime loads it; 'plugin' = bytedeploy::BitLinear custom op carrying "
                   "packed 2-bit weights (TensorRT plugin, ONNX Runtime custom op). [default: qdq]")
@click.option("--patch-decode", type=click.Choice(["plugin"]), default=None,
              help="bGPT only: 'plugin' = also export patch_decode_fused, one bytedeploy::BytePatchDecode node that "
                   "decodes a whole patch (greedy) in the TensorRT plugin; the trt backend then makes one call per "
                   "patch. [default: none, the byte_patch graphs]")
@click.option("--opset", type=int, default=None, help="ONNX opset (18 or newer) [default: 18].")
@click.option("--ort-fusions/--no-ort-fusions", default=False, show_default=True,
              help="Also write each graph's ONNX Runtime variant with contrib-op fusions (SkipLayerNormalization, "
                   "MultiHeadAttention), where any applies; the ONNX Runtime backends run it, TensorRT the standard "
                   "graph. It holds a second copy of the graph's weights; off until a GPU run shows it faster.")
@click.option("--force", is_flag=True, help="Replace an existing bundle in --out.")
def export(checkpoint, out, precision, bitlinear, patch_decode, opset, ort_fusions, force):
    """Export CHECKPOINT as a deployment bundle: ONNX graphs, tokenizer files and bundle.json."""
    from bytedeploy.exporters import export as export_bundle

    bundle = export_bundle(checkpoint, out, precision, bitlinear, opset, force, patch_decode, ort_fusions)
    click.echo(f"wrote {out}: {bundle.family}, {len(bundle.graphs)} graphs ({', '.join(bundle.graphs)}), "
               f"{bundle.precision}, opset {bundle.opset}")


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("bundle", type=click.Path())
@click.option("--backends", default="ort", show_default=True,
              help="Comma-separated backends to compare with eager: ort, ort-cuda, trt (needs built engines).")
@click.option("--decode-steps", type=int, default=32, show_default=True,
              help="Decode steps (with the KV cache) compared after the prefill.")
@click.option("--batch-size", type=int, default=2, show_default=True, help="Batch of the compared inputs.")
@click.option("--atol", type=float, default=None,
              help=f"Absolute tolerance [default by the bundle's precision: {tolerance_help()}].")
@click.option("--rtol", type=float, default=None,
              help="Relative tolerance, of the eager value; an element fails when it is off by more than both "
                   "[default: by precision, as --atol].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
def verify(checkpoint, bundle, backends, decode_steps, batch_size, atol, rtol, seed):
    """Run eager PyTorch and the BUNDLE's graphs on the same inputs and compare every output (polygraphy).

    Prints one row per graph output and exits non-zero when any output differs beyond the tolerances."""
    from bytedeploy.verify import verify as run_verify

    ok = run_verify(checkpoint, bundle, [b.strip() for b in backends.split(",") if b.strip()], decode_steps,
                    batch_size, atol, rtol, seed)
    if not ok:
        raise click.ClickException("outputs differ beyond the tolerances (see the table above)")


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("-o", "--out", type=click.Path(), default=None, help="Engine folder [default: BUNDLE/engines].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Precision TensorRT may choose kernels in [default: the bundle's]. TensorRT-RTX builds strongly "
                   "typed networks: its engines always compute in the bundle's precision.")
@click.option("--max-batch", type=int, default=None,
              help="Largest batch of the optimization profiles [default: 8; with --target or --max-memory the "
                   "largest that fits, up to 64].")
@click.option("--max-len", type=int, default=None,
              help="Longest sequence / KV-cache length of the profiles [default: the model's context; with --target "
                   "or --max-memory the longest that fits].")
@click.option("--target", default=None,
              help=f"Build for a named device ({', '.join(t for t in TARGETS if t != 'cpu')}): its usable memory "
                   "bounds the profiles, and its GPU must be this one.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory the model may use, e.g. 6GiB: the profiles are the largest that fit (see `bytedeploy "
                   "doctor BUNDLE --memory SIZE`).")
@click.option("--timing-cache", type=click.Path(), default=None,
              help="Timing cache file, read and updated [default: BUNDLE/engines/timing.cache].")
@click.option("--plugins", type=click.Path(), default=None,
              help="The C++ plugin library (libbytedeploy_trt_plugins.so, `python -m bytedeploy.plugins.build_trt`) "
                   "for graphs with bytedeploy plugins [default: the one built beside the package, else the Python "
                   "plugins, which need torch].")
@click.option("--force", is_flag=True, help="Rebuild engines that exist.")
def build(bundle, out, precision, max_batch, max_len, target, max_memory, timing_cache, plugins, force):
    """Build TensorRT engines from the BUNDLE's graphs, with optimization profiles from its config.

    Uses the `tensorrt` module when importable, else `tensorrt_rtx` (ahead-of-time build without a GPU; no plugin
    layers, so bundles exported with --bitlinear plugin or --patch-decode plugin are refused under it)."""
    from bytedeploy.exporters.trt_build import build_engines

    if target is not None or max_memory is not None:
        from bytedeploy.exporters.bundle import load_bundle
        from bytedeploy.runtimes.targets import get_target, parse_size, plan_build

        bundle = load_bundle(bundle)
        plan = plan_build(bundle, get_target(target) if target else None,
                          parse_size(max_memory) if max_memory else None, max_batch, max_len)
        if plan is not None:
            best, line = plan
            click.echo(line)
            max_batch, max_len = best.batch, best.context
    build_engines(bundle, out, precision, max_batch or 8, max_len, timing_cache, force, plugins)


@click.command()
@click.argument("checkpoint", metavar="CHECKPOINT_OR_BUNDLE", type=click.Path())
@click.option("--backends", default=None,
              help="Comma-separated: eager-reference, eager, burst (sigma-GPT), native, native+compile (bGPT), and "
                   "on an exported bundle (the argument, or --bundle beside a checkpoint): ort, ort-cuda, trt. Rows "
                   "that cannot run here are recorded as skipped. [default: eager-reference,eager,native; on a "
                   "bundle: ort]")
@click.option("--batch-sizes", default="1,8,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--max-new", type=int, default=None,
              help="New tokens (bytes for bGPT) per row [default: 256, or fewer where the model's context holds "
                   "fewer (sigma-GPT, the Bayesian-flow LM)].")
@click.option("--prompt", default="import os\n", show_default=True, help="Prompt text (UTF-8).")
@click.option("--bundle", type=click.Path(), default=None, help="Exported bundle for the ort / ort-cuda / trt rows.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed calls per row (the median is kept).")
@click.option("--reference-max-batch", type=int, default=8, show_default=True,
              help="Largest batch run on eager-reference (it generates the rows one after another).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Weights and activations of the checkpoint backends.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Family generate option, e.g. ext=py, n_steps=100, order=random, bitlinear=fp (repeatable).")
@click.option("--top-k", type=int, default=0, show_default=True, help="Top-k (0 = off).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Top-p (1 = off).")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 = greedy, so that every backend's output can be compared.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--device", default=None, help="cuda or cpu [default: cuda when available].")
@click.option("--out", type=click.Path(), default=None, help="Write the results as JSON here.")
@click.option("--plot", type=click.Path(), default=None, help="Write a PNG plot here (needs matplotlib).")
@click.option("--profile", is_flag=True,
              help="Also run each native row at batch 1 once under torch.profiler: kernels and host time per step.")
@click.option("--force", is_flag=True, help="Overwrite existing --out / --plot files.")
def bench(checkpoint, backends, batch_sizes, max_new, prompt, bundle, repeats, reference_max_batch, dtype, options,
          top_k, top_p, temperature, seed, device, out, plot, profile, force):
    """Time generation of a CHECKPOINT (or an exported BUNDLE) on each backend x batch size: latency per token (and
    per patch for bGPT), throughput, peak GPU memory, the speed-up over eager-reference and, on a GPU, the share of
    the step's bound (weight bytes over the measured copy bandwidth, or one graph replay), measured in one run. On a
    bundle: its ONNX Runtime / TensorRT backends only, without PyTorch."""
    from bytedeploy.bench import (
        BUNDLE_DEFAULT,
        CHECKPOINT_DEFAULT,
        BenchConfig,
        is_bundle,
        parse_value,
        run_bench,
        summary_lines,
        write_json,
        write_plot,
    )
    from bytedeploy.cli_common import argument_bytes, check_writable_parent
    from bytedeploy.errors import UserError
    from bytedeploy.sampling import SamplingConfig

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
        sampling = SamplingConfig(top_k, top_p, temperature, seed)
    except ValueError as e:
        raise UserError(f"bad --batch-sizes or sampling option: {e}") from None
    family_options = {}
    for kv in options:
        if "=" not in kv:
            raise UserError(f"--option takes KEY=VALUE, got {kv!r}")
        key, value = kv.split("=", 1)
        family_options[key] = parse_value(value)
    for path in filter(None, (out, plot)):  # refused now, not after the run
        if Path(path).exists() and not force:
            raise UserError(f"{path} exists; use --force to overwrite")
        check_writable_parent(Path(path))
    backends = backends or (BUNDLE_DEFAULT if is_bundle(checkpoint) else CHECKPOINT_DEFAULT)
    bc = BenchConfig([b.strip() for b in backends.split(",") if b.strip()], sizes, max_new,
                     argument_bytes(prompt, "--prompt"), repeats, reference_max_batch, bundle, device, dtype,
                     family_options, sampling, profile)
    result = run_bench(checkpoint, bc, echo=click.echo)
    click.echo("\n".join(summary_lines(result)))
    if out:
        write_json(result, out)
        click.echo(f"wrote {out}")
    if plot:
        click.echo(write_plot(result, plot))


@click.command()
@click.argument("bundle", type=click.Path(), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--memory", default=None, metavar="SIZE",
              help="Plan the BUNDLE's memory in SIZE (e.g. 8GiB, 8GB, 512MiB): weights + KV caches + workspace at "
                   "each batch size and context length, and the largest that fits.")
def doctor(bundle, as_json, memory):
    """What this machine is and what it can run: platform, Jetson module and JetPack, GPU, runtime packages, and
    for a BUNDLE (or its engines folder) whether each backend runs here, or why not.

    Reads the system under BYTEDEPLOY_SYSROOT (default /)."""
    from bytedeploy.runtimes.doctor import doctor as report
    from bytedeploy.runtimes.targets import parse_size

    click.echo(report(bundle, parse_size(memory) if memory is not None else None, as_json))


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--target", required=True,
              help=f"The device: {', '.join(TARGETS)}. It picks the onnxruntime package (NVIDIA's onnxruntime-gpu "
                   "for JetPack on a Jetson) and, for a Jetson, checks that the model fits its memory.")
@click.option("-o", "--out", type=click.Path(), required=True, help="The pack to write, NAME.tar.gz.")
@click.option("--wheel", type=click.Path(), default=None,
              help="bytedeploy's wheel to put in [default: built with pip from the source tree it was installed "
                   "from].")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
def pack(bundle, target, out, wheel, force):
    """Pack the BUNDLE for a device into one archive: the bundle, bytedeploy's wheel, a requirements file for the
    target, a `run` script, and SHA256SUMS.

    On the device: tar -xzf NAME.tar.gz && NAME/run --prompt "..." (the run script makes a virtual environment,
    installs, builds TensorRT engines where TensorRT is, then runs `bytedeploy generate` with its arguments;
    `NAME/run serve ...` runs `bytedeploy serve`)."""
    from bytedeploy.runtimes.pack import pack as write_pack

    for line in write_pack(bundle, target, out, force, wheel):
        click.echo(line)


@click.command()
@click.argument("archive", type=click.Path())
@click.option("-o", "--out", type=click.Path(), default=".", show_default=True,
              help="Folder to unpack into; the pack lands in OUT/NAME.")
@click.option("--force", is_flag=True, help="Replace an existing OUT/NAME.")
def unpack(archive, out, force):
    """Unpack a pack made by `bytedeploy pack`: refuses members that would land outside OUT, links and devices, and
    checks every file against SHA256SUMS before the folder is put in place."""
    from bytedeploy.runtimes.pack import unpack as unpack_archive

    folder = unpack_archive(archive, out, force)
    click.echo(f"unpacked {folder}; run it with {folder / 'run'} --prompt ...")


COMMANDS = (export, verify, build, bench, doctor, pack, unpack, serve)
