"""The `bytedeploy serve` command (mounted by deploy_cli.py)."""

from __future__ import annotations

import click


@click.command()
@click.argument("path", metavar="CKPT_OR_BUNDLE", type=click.Path())
@click.option("--backend", default=None,
              help="A checkpoint: eager (default), eager-reference, burst (sigma-GPT), native, native+compile "
                   "(bGPT). A bundle: ort (default), ort-cuda, trt, burst (sigma-GPT).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network (use --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests (choices) generated together in the running batch.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting to join the batch; past it the server answers 429 with Retry-After.")
@click.option("--api-key", envvar="BYTEDEPLOY_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 [env: BYTEDEPLOY_API_KEY].")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds a request may take, queue included (504 past it).")
@click.option("--max-body", "max_body_bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body in bytes (413 past it).")
@click.option("--model-name", default=None, help="The model id /v1/models reports [default: the folder's name].")
@click.option("--device", default="auto", show_default=True, help="A checkpoint's device: cpu, cuda, cuda:N, auto.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="A checkpoint's weights and activations.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="HTTP worker processes, all feeding the one model process (more for many concurrent clients); "
                   "--max-queue is shared out among them.")
def serve(path, backend, host, port, max_batch, max_queue, api_key, request_timeout, max_body_bytes, model_name,
          device, dtype, workers):
    """Serve a checkpoint or bundle over an OpenAI-compatible HTTP API (POST /v1/completions, streaming too),
    batching concurrent requests step by step; /health, /ready and /metrics (Prometheus). The model runs in a
    process of its own, fed by the HTTP worker processes. Stops on SIGTERM or Ctrl-C after the requests in flight
    finish. No per-request access log (it costs the event loop under load): /metrics counts requests by status."""
    from bytedeploy.serve.app import ServeConfig, bind, run
    from bytedeploy.serve.scheduler import ModelSpec

    sock = bind(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it may use it", err=True)
    with sock:  # run() closes it here once the workers have it; an error before that closes it now
        run(ModelSpec(str(path), backend, device, dtype),
            ServeConfig(host, port, max_batch, max_queue, api_key, request_timeout, max_body_bytes,
                        model_name or "", workers), sock, echo=lambda line: click.echo(line, err=True))
