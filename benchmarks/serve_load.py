"""Load on a running `bytedeploy serve`: 1, 8 and 64 concurrent streaming clients, each sending completions one after
another; requests/s, tokens/s, and p50/p99 of time to first token and of per-token latency, as JSON and a PNG.

    bytedeploy serve runs/bgpt-base --backend native --dtype bfloat16 --max-batch 64 &
    python -m bytedeploy.benchmarks.serve_load --max-tokens 256 --out serve-load.json --plot serve-load.png

Each level first runs one untimed round (one completion per client: the server's first use of that batch size, e.g.
the native backend's graph capture), then until every client has sent --requests completions or --seconds have
passed, whichever comes first (requests in flight then finish). A client streams with stream_options.include_usage:
tokens are the server's usage counts (the model's unit: bytes for bGPT), time to first token runs from sending the
request to the first chunk with output, and per-token latency is a request's (last chunk - first chunk) / (tokens -
its first chunk's tokens), the time per token after the first chunk (a bGPT chunk is a patch of 16 bytes).
Each client keeps one HTTP/1.1 connection open for its requests, as OpenAI's client does. Requests/s and tokens/s
are over the level's wall time. The clients are threads spread over --processes processes (a client parses every
chunk: one Python process would become the bottleneck of a fast server). Only a server on this machine (localhost)
is measured. Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import statistics
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Sample:
    ttft: float  # seconds to the first chunk with output
    per_token: float | None  # seconds per token after the first chunk (None: one chunk only)
    tokens: int
    seconds: float


OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never through a proxy


class Connection:
    """One client's HTTP/1.1 connection to the server, kept open from request to request (as OpenAI's client keeps
    its connections), opened again after an error."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.conn = parts.hostname, parts.port or 80, None

    def post(self, path: str, data: bytes, headers: dict, timeout: float) -> http.client.HTTPResponse:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        self.conn.timeout = timeout
        if self.conn.sock is not None:
            self.conn.sock.settimeout(timeout)
        try:
            self.conn.request("POST", path, body=data, headers=headers)
            return self.conn.getresponse()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def stream_completion(connection: Connection, body: dict, api_key: str | None, unit: str, timeout: float) -> Sample:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(dict(body, stream=True, stream_options={"include_usage": True})).encode()
    start = time.perf_counter()
    first = last = None
    first_tokens, tokens = 0, 0
    response = connection.post("/v1/completions", data, headers, timeout)
    try:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        for line in response:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                raw = choice.get("bytedeploy", {}).get("output_base64")
                if unit != "byte":
                    n = len(choice["text"])
                else:
                    n = len(choice["text"].encode() if raw is None else base64.b64decode(raw))
                if n:
                    last = time.perf_counter()
                    if first is None:
                        first, first_tokens = last, n
    except BaseException:
        connection.close()  # a response left unread would be read as the next one's
        raise
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the stream had no output")
    after_first = tokens - first_tokens
    return Sample(first - start, (last - first) / after_first if after_first > 0 else None, tokens, end - start)


def run_clients(url: str, clients: int, requests: int, deadline: float, body: dict, api_key: str | None,
                unit: str) -> tuple[list[Sample], list[str], float, float]:
    """clients threads of this process, each sending up to requests completions until deadline (time.time()) ->
    (samples, errors, start, end)."""
    samples: list[Sample] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        connection = Connection(url)
        try:
            for _ in range(requests):
                if time.time() >= deadline:
                    return
                try:
                    sample = stream_completion(connection, body, api_key, unit, timeout=deadline - time.time() + 60)
                except Exception as e:  # noqa: BLE001 - counted and reported; the load goes on
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    samples.append(sample)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples, errors, start, time.time()


def run_level(url: str, clients: int, requests: int, seconds: float, body: dict, api_key: str | None,
              unit: str, processes: int = 1) -> dict:
    """The clients spread over processes (a client parses every event it gets: one Python process would become
    the bottleneck of a fast server); the level's wall time runs from the first client's start to the last one's
    end."""
    deadline = time.time() + seconds
    shares = [n for n in (clients // processes + (i < clients % processes) for i in range(processes)) if n]
    args = [(url, n, requests, deadline, body, api_key, unit) for n in shares]
    if len(shares) == 1:
        parts = [run_clients(*args[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(len(shares)) as pool:
            parts = pool.starmap(run_clients, args)
    samples = [sample for part in parts for sample in part[0]]
    errors = [error for part in parts for error in part[1]]
    wall = max(part[3] for part in parts) - min(part[2] for part in parts)
    per_token = [s.per_token for s in samples if s.per_token is not None]
    return {
        "clients": clients, "requests": len(samples), "errors": len(errors), "first_errors": errors[:3],
        "seconds": wall, "requests_per_s": len(samples) / wall, "tokens": sum(s.tokens for s in samples),
        "tokens_per_s": sum(s.tokens for s in samples) / wall,
        "ttft_p50_ms": 1e3 * percentile([s.ttft for s in samples], 50),
        "ttft_p99_ms": 1e3 * percentile([s.ttft for s in samples], 99),
        "per_token_p50_ms": 1e3 * percentile(per_token, 50), "per_token_p99_ms": 1e3 * percentile(per_token, 99),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (inclusive method); nan without values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


def get_json(url: str, api_key: str | None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with OPENER.open(request, timeout=10) as response:
        return json.loads(response.read())


def write_plot(result: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot not written: matplotlib is not installed (pip install matplotlib)"
    levels = result["levels"]
    xs = [level["clients"] for level in levels]
    fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_rate.plot(xs, [level["tokens_per_s"] for level in levels], marker="o")
    ax_rate.set_ylabel(f"{result['unit']}s / s (all clients)")
    for key, label in (("ttft_p50_ms", "time to first token p50"), ("ttft_p99_ms", "time to first token p99"),
                       ("per_token_p50_ms", "per-token latency p50"), ("per_token_p99_ms", "per-token latency p99")):
        ax_lat.plot(xs, [level[key] for level in levels], marker="o", label=label)
    ax_lat.set_ylabel("ms")
    ax_lat.legend(fontsize=8)
    for ax in (ax_rate, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streaming clients")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"bytedeploy serve: {result['model']} ({result['family']}, {result['backend']}), "
                 f"{result['max_tokens']} new {result['unit']}s per request", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bytedeploy.benchmarks.serve_load", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="The server (on this machine).")
    parser.add_argument("--api-key", default=None, help="Its --api-key, if it has one.")
    parser.add_argument("--clients", default="1,8,64", help="Concurrency levels, comma-separated.")
    parser.add_argument("--requests", type=int, default=8, help="Completions per client and level at most.")
    parser.add_argument("--seconds", type=float, default=60.0, help="Time per level at most.")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of each completion.")
    parser.add_argument("--prompt", default="import os\n", help="The prompt of each completion.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    parser.add_argument("--processes", type=int, default=None,
                        help="Client processes per level [default: min(clients, 8, half this machine's cores)].")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    parser.add_argument("--plot", type=Path, default=None, help="Write a PNG plot here (needs matplotlib).")
    args = parser.parse_args(argv)
    host = urllib.parse.urlsplit(args.url).hostname
    if host not in LOCAL_HOSTS:
        parser.error(f"--url must be a server on this machine ({', '.join(LOCAL_HOSTS)}), not {host}")
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    if (not levels or min(levels) < 1 or args.requests < 1 or args.seconds <= 0 or args.max_tokens < 1
            or (args.processes is not None and args.processes < 1)):
        parser.error("--clients, --requests, --seconds, --max-tokens and --processes must be positive")
    url = args.url.rstrip("/")
    ready = get_json(url + "/ready", None)
    unit = {"bgpt": "byte", "bitnet": "byte", "bfn": "token"}.get(ready["family"], "char")
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": 0}
    result = {"command": "python -m bytedeploy.benchmarks.serve_load", "url": url, "model": ready["model"],
              "family": ready["family"], "backend": ready["backend"], "unit": unit, "max_tokens": args.max_tokens,
              "prompt": args.prompt, "temperature": args.temperature, "requests_per_client": args.requests,
              "seconds_per_level": args.seconds, "levels": []}
    for clients in levels:
        processes = min(clients, args.processes or min(8, max((os.cpu_count() or 2) // 2, 1)))
        run_level(url, clients, 1, args.seconds, body, args.api_key, unit)  # the untimed round
        level = run_level(url, clients, args.requests, args.seconds, body, args.api_key, unit, processes)
        level["processes"] = processes
        result["levels"].append(level)
        print(f"{clients:>3} clients: {level['requests']} requests ({level['errors']} errors) in "
              f"{level['seconds']:.1f} s, {level['requests_per_s']:.2f} requests/s, {level['tokens_per_s']:,.0f} "
              f"{unit}s/s; first token p50 {level['ttft_p50_ms']:.1f} ms p99 {level['ttft_p99_ms']:.1f} ms; per "
              f"{unit} p50 {level['per_token_p50_ms']:.3f} ms p99 {level['per_token_p99_ms']:.3f} ms")
    single = next((lv["tokens_per_s"] for lv in result["levels"] if lv["clients"] == 1), None)
    if single:
        for level in result["levels"]:
            level["speedup_vs_one_client"] = level["tokens_per_s"] / single
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.plot:
        print(write_plot(result, args.plot))
    return result


if __name__ == "__main__":
    main()
