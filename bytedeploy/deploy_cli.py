"""Deployment commands: export (checkpoint -> bundle), verify (numerics across backends), build (TensorRT engines).

Mounted on the main ``bytedeploy`` group by cli.py.
"""

from __future__ import annotations

import click


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", type=click.Path(), required=True, help="Bundle folder to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Floating-point type of the graphs' weights and activations.")
@click.option("--bitlinear", type=click.Choice(["qdq", "plugin"]), default=None,
              help="BitNet only: 'qdq' = standard ONNX ops (2-bit weights as INT2/INT4 initializers with "
                   "DequantizeLinear), any runtime loads it; 'plugin' = bytedeploy::BitLinear custom op carrying "
                   "packed 2-bit weights (TensorRT plugin, ONNX Runtime custom op). [default: qdq]")
@click.option("--opset", type=int, default=None, help="ONNX opset (18 or newer) [default: 18].")
@click.option("--force", is_flag=True, help="Replace an existing bundle in --out.")
def export(checkpoint, out, precision, bitlinear, opset, force):
    """Export CHECKPOINT as a deployment bundle: ONNX graphs, tokenizer files and bundle.json."""
    from bytedeploy.exporters import export as export_bundle

    bundle = export_bundle(checkpoint, out, precision, bitlinear, opset, force)
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
@click.option("--atol", type=float, default=None, help="Absolute tolerance [default: by precision, see README].")
@click.option("--rtol", type=float, default=None, help="Relative tolerance [default: by precision, see README].")
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
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True,
              help="Precision TensorRT may choose kernels in.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Largest batch of the optimization profiles.")
@click.option("--max-len", type=int, default=None,
              help="Longest sequence / KV-cache length of the profiles [default: the model's context].")
@click.option("--timing-cache", type=click.Path(), default=None,
              help="Timing cache file, read and updated [default: BUNDLE/engines/timing.cache].")
@click.option("--force", is_flag=True, help="Rebuild engines that exist.")
def build(bundle, out, precision, max_batch, max_len, timing_cache, force):
    """Build TensorRT engines from the BUNDLE's graphs, with optimization profiles from its config.

    Uses the `tensorrt` module when importable, else `tensorrt_rtx` (ahead-of-time build without a GPU; no plugin
    layers, so plugin-mode BitNet bundles are refused under it)."""
    from bytedeploy.exporters.trt_build import build_engines

    build_engines(bundle, out, precision, max_batch, max_len, timing_cache, force)


COMMANDS = (export, verify, build)
