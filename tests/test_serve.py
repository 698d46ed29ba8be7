"""`bytedeploy serve`: real server processes on free ports of 127.0.0.1, real HTTP.

Every family's tiny checkpoint (random weights far from ties) is served on the CPU; plain and streamed greedy
completions equal offline generate() (bytedeploy.runner.open_model), alone and concurrent. A char GPT-2 bundle is
served by a process in which torch cannot be imported. One server with tight limits answers every error path
(400, 401, 404, 413, 429 with Retry-After, 504), a client that goes away frees its row, metrics parse with
prometheus_client's parser, the OpenAI client works unchanged, and SIGTERM lets a stream in flight finish.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from bytedeploy.checkpoint import save_checkpoint
from bytedeploy.data.sentencepiece_tokenizer import train_sentencepiece
from bytedeploy.exporters import export
from bytedeploy.families.bfn import parse_infill
from bytedeploy.generation import GenerateRequest
from bytedeploy.models import bfn, bgpt, bitnet, char_gpt2
from bytedeploy.models import sigma_gpt as sg
from bytedeploy.runner import open_model
from bytedeploy.sampling import SamplingConfig
from bytedeploy.tokenizers import CharTokenizer

TEXT = "def main():\n    return [x for x in range(10)]\n"
CORPUS = "".join(f"def f_{i}(x, y={i % 7}):\n    return x * {i} + y  # value {i * 31}\n\nclass C{i}:\n    pass\n"
                 for i in range(300))
GREEDY = SamplingConfig(temperature=0.0)
KEY = "test-key"
# first on PYTHONPATH, torch cannot be imported in the bundle's server and its model process: what the deploy install
# (no torch) sees
NO_TORCH = "raise ImportError('No module named torch (the deploy install has none)')\n"


def randomize(model: torch.nn.Module, std: float) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model


def make_checkpoints(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(TEXT)
    cfg = bgpt.Config(patch_size=8, n_patches=12, n_embd=32, n_layer=2, n_head=4, byte_n_layer=2, byte_n_head=4)
    model = randomize(bgpt.Model(cfg), 0.5)
    with torch.no_grad():
        model.byte_wte.weight[bgpt.SPECIAL] *= 0.2
    paths = {"bgpt": save_checkpoint(root / "bgpt", model, "bgpt", cfg)}
    cfg = char_gpt2.Config(**char_gpt2.PRESETS["tiny"], vocab_size=tok.vocab_size)
    paths["char-gpt2"] = save_checkpoint(root / "char-gpt2", randomize(char_gpt2.Model(cfg), 0.5), "char-gpt2", cfg,
                                         assets={char_gpt2.TOKENIZER_FILE: tok.to_json()})
    cfg = sg.Config(**sg.PRESETS["tiny"], vocab_size=tok.vocab_size)
    paths["sigma-gpt"] = save_checkpoint(root / "sigma-gpt", randomize(sg.Model(cfg), 0.3), "sigma-gpt", cfg,
                                         assets={sg.TOKENIZER_FILE: tok.to_json()})
    cfg = bitnet.Config(**dict(bitnet.PRESETS["tiny"], block_size=32))
    paths["bitnet"] = save_checkpoint(root / "bitnet", randomize(bitnet.Model(cfg), 0.5), "bitnet", cfg)
    sp_path = train_sentencepiece(CORPUS, 60, root / "sp.model")
    cfg = bfn.Config(vocab_size=60, seq_len=12, n_layer=2, n_head=2, n_embd=16, time_dim=8, dropout=0.0, n_steps=6)
    paths["bfn"] = save_checkpoint(root / "bfn", randomize(bfn.Model(cfg), 0.3), "bfn", cfg,
                                   assets={bfn.TOKENIZER_FILE: sp_path.read_bytes()})
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, path: Path, *args: str, key: str | None = None,
                 launcher: tuple = (sys.executable, "-m", "bytedeploy"), no_torch: Path | None = None):
        self.key = key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["serve", str(path), "--port", str(self.port), "--device", "cpu", *args]
        if key:
            argv += ["--api-key", key]
        command = [str(c) for c in (*launcher, *argv)]
        env = dict(os.environ, OMP_NUM_THREADS="1", BYTEDEPLOY_ORT_THREADS="1")
        if no_torch is not None:  # a folder whose torch.py fails to import
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(no_torch), env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 90.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("server not ready in time")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def headers(self, key: str | None) -> dict:
        key = self.key if key == "own" else key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, body: dict, key: str | None = "own") -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", json=body, headers=self.headers(key), timeout=60)

    def open_stream(self, body: dict):
        return httpx.stream("POST", self.url + "/v1/completions", json=dict(body, stream=True),
                            headers=self.headers("own"), timeout=60)

    def stream(self, body: dict) -> list[dict]:
        """The streamed events' JSON bodies; asserts the stream ends with data: [DONE]."""
        with self.open_stream(body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(d) for d in data[:-1]]

    def metrics(self) -> dict:
        """{sample name with labels: value} of /metrics, parsed by prometheus_client."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name: s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Every server starts at once (they load in parallel), then each is awaited."""
    root = tmp_path_factory.mktemp("serve")
    paths = make_checkpoints(root)
    export(paths["char-gpt2"], root / "char-bundle")
    paths["bundle"] = root / "char-bundle"
    servers = {family: Server(paths[family], "--max-batch", "4") for family in ("sigma-gpt", "bitnet")}
    servers["bgpt"] = Server(paths["bgpt"], "--max-batch", "4", "--workers", "2")  # two HTTP workers, one model
    # the error paths' server: BFN, whose requests take as long as their n_steps asks
    servers["bfn"] = Server(paths["bfn"], "--max-batch", "1", "--max-queue", "1", "--request-timeout", "1.5",
                            "--max-body", "4096", key=KEY)
    (root / "no-torch").mkdir()
    (root / "no-torch" / "torch.py").write_text(NO_TORCH)
    servers["bundle"] = Server(paths["bundle"], "--max-batch", "4", no_torch=root / "no-torch")
    try:
        for server in servers.values():
            server.wait_ready()
        yield paths, servers
    finally:
        for server in servers.values():
            server.stop()


def offline(path: Path, prompt: bytes, max_new: int, **options) -> bytes:
    return open_model(path, device="cpu").generate(GenerateRequest(prompt, max_new, 1, GREEDY, options)).outputs[0]


def streamed_bytes(events: list[dict]) -> bytes:
    """A stream's output bytes: bytedeploy.output_base64 where a chunk carries it, else its text."""
    out = b""
    for e in events:
        for c in e["choices"]:
            raw = c.get("bytedeploy", {}).get("output_base64")
            out += c["text"].encode("utf-8") if raw is None else base64.b64decode(raw)
    return out


def answer_bytes(choice: dict) -> bytes:
    raw = choice.get("bytedeploy", {}).get("output_base64")
    return choice["text"].encode("utf-8") if raw is None else base64.b64decode(raw)


def test_command_errors_are_one_line(setup, tmp_path):
    from click.testing import CliRunner

    from bytedeploy.cli import cli

    paths, servers = setup
    busy = str(servers["bgpt"].port)
    for args, message in [([str(tmp_path / "nothing")], "nothing"),
                          ([str(paths["bundle"]), "--backend", "eager-reference"], "a bundle runs on"),
                          ([str(paths["bgpt"]), "--backend", "burst", "--device", "cpu"], "no backend 'burst'"),
                          ([str(paths["bundle"]), "--port", busy], f"cannot serve on 127.0.0.1:{busy}"),
                          ([str(paths["bundle"]), "--host", "192.0.2.1"], "cannot serve on 192.0.2.1")]:
        result = CliRunner().invoke(cli, ["serve", *args])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.startswith("Error: ") and message in result.output, result.output


@pytest.mark.parametrize("family, prompt, max_tokens, extension", [
    ("bgpt", "import ", 30, {}),
    ("bgpt", "", 20, {"ext": "py"}),
    ("sigma-gpt", "def ", 12, {}),
    ("sigma-gpt", "def ", 12, {"order": "random"}),
    ("bitnet", "ab", 40, {}),
    ("bgpt", "", 20, {"input_base64": base64.b64encode(b"X:1\nK:C\nCDEF|").decode(), "input_ext": "abc",
                      "target_ext": "mid"}),
    ("bfn", "def f_1", 3, {"n_steps": 4}),
    ("bfn", "", 11, {"n_steps": 3, "infill": "def [[2]](x[[3]]"}),
])
def test_plain_and_streamed_greedy_equal_offline_generate(setup, family, prompt, max_tokens, extension):
    paths, servers = setup
    options = dict(extension)
    if "input_base64" in options:
        options["input_data"] = base64.b64decode(options.pop("input_base64"))
    if "infill" in options:
        options["infill"] = parse_infill(options["infill"])
    expected = offline(paths[family], prompt.encode(), max_tokens, **options)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": 0, "bytedeploy": extension}
    r = servers[family].post(body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "text_completion" and answer["model"] == family
    choice = answer["choices"][0]
    assert answer_bytes(choice) == expected and choice["finish_reason"] in ("length", "stop")
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    events = servers[family].stream(body)
    assert streamed_bytes(events) == expected
    assert events[-1]["choices"][0]["finish_reason"] is not None
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    if family in ("bgpt", "bitnet"):  # several steps, several chunks (a patch, a byte)
        assert len(events) > 1


def test_bgpt_streams_whole_patches_and_binary_output_as_base64(setup):
    paths, servers = setup
    events = servers["bgpt"].stream({"prompt": "", "max_tokens": 40, "temperature": 0})
    sizes = [len(streamed_bytes([e])) for e in events]  # whole patches of 8 bytes: one a chunk, or several that
    assert sum(sizes) == 40 and len(sizes) > 1 and all(n % 8 == 0 for n in sizes)  # queued up while the loop was busy
    raw = offline(paths["bgpt"], b"\x00\xff\x10", 12)
    r = servers["bgpt"].post({"max_tokens": 12, "temperature": 0,
                              "bytedeploy": {"prompt_base64": base64.b64encode(b"\x00\xff\x10").decode()}})
    assert answer_bytes(r.json()["choices"][0]) == raw and r.json()["usage"]["prompt_tokens"] == 3


def test_concurrent_requests_return_offline_greedy_text(setup):
    """12 clients against a batch of 4 (bGPT: the batched session) and of 4 (the bundle: a step session each): rows
    join and leave mid-way, and every answer is what generate() gives alone."""
    paths, servers = setup
    cases = {"bgpt": [(p, n) for p in ("import ", "def f(x):\n  ret", "", "abc") for n in (9, 25, 60)],
             "bundle": [(p, n) for p in ("def ", "ret", "") for n in (5, 17, 70, 120)]}
    for name, requests in cases.items():
        expected = [offline(paths[name], p.encode(), n) for p, n in requests]
        bodies = [{"prompt": p, "max_tokens": n, "temperature": 0} for p, n in requests]
        server = servers[name]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:  # odd max_tokens plain, even streamed
            answers = list(pool.map(lambda b, s=server: s.post(b) if b["max_tokens"] % 2 else s.stream(b), bodies))
        got = [answer_bytes(a.json()["choices"][0]) if isinstance(a, httpx.Response) else streamed_bytes(a)
               for a in answers]
        assert got == expected, name


def test_two_workers_share_the_model_and_their_metrics_add_up(setup):
    """bGPT's server has two HTTP worker processes: requests on either reach the one model process, and /metrics
    (whichever worker answers) counts them all."""
    paths, servers = setup
    server = servers["bgpt"]
    before = server.metrics()
    bodies = [{"prompt": "import ", "max_tokens": n, "temperature": 0} for n in (5, 9, 14, 20, 31, 40)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = [r.json() for r in pool.map(server.post, bodies)]
    assert [answer_bytes(a["choices"][0]) for a in answers] == [offline(paths["bgpt"], b"import ", b["max_tokens"])
                                                                for b in bodies]
    after = server.metrics()
    ok = 'bytedeploy_requests_total{"status": "200"}'
    assert after[ok] - before.get(ok, 0) == len(bodies)
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    assert after["bytedeploy_generated_tokens_total"] - before.get("bytedeploy_generated_tokens_total", 0) == tokens
    assert after["bytedeploy_step_seconds_count"] > before.get("bytedeploy_step_seconds_count", 0)
    assert after["bytedeploy_running_batch_size"] == 0 and after["bytedeploy_queue_depth"] == 0


def test_bundle_served_without_torch_and_sampled_choices(setup):
    paths, servers = setup
    server = servers["bundle"]
    ready = httpx.get(server.url + "/ready").json()
    assert ready["family"] == "char-gpt2" and ready["backend"] == "ort"
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "char-bundle"
    body = {"prompt": "def ", "max_tokens": 30, "temperature": 0.9, "top_k": 5, "top_p": 0.9, "seed": 7, "n": 3}
    first, again = server.post(body).json(), server.post(body).json()
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]  # seeded
    assert len(set(texts)) > 1 and [c["index"] for c in first["choices"]] == [0, 1, 2]  # choice i: seed + i
    model = open_model(paths["bundle"])
    expected = [model.generate(GenerateRequest(b"def ", 30, 1, SamplingConfig(5, 0.9, 0.9, 7 + i))).outputs[0].decode()
                for i in range(3)]
    assert texts == expected


def test_stop_sequences_cut_the_text(setup):
    paths, servers = setup
    full = offline(paths["bundle"], b"def ", 60).decode()
    stop = full[10:12]
    cut = full[:full.index(stop)]
    r = servers["bundle"].post({"prompt": "def ", "max_tokens": 60, "temperature": 0, "stop": [stop, "@@"]})
    choice = r.json()["choices"][0]
    assert choice["text"] == cut and choice["finish_reason"] == "stop"
    events = servers["bundle"].stream({"prompt": "def ", "max_tokens": 60, "temperature": 0, "stop": stop,
                                       "stream_options": {"include_usage": True}})
    assert "".join(c["text"] for e in events for c in e["choices"]) == cut
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(cut) + len(stop)


def test_openai_client_works_unchanged(setup):
    openai = pytest.importorskip("openai")
    paths, servers = setup
    client = openai.OpenAI(base_url=servers["bundle"].url + "/v1", api_key="unused")
    expected = offline(paths["bundle"], b"ret", 25).decode()
    answer = client.completions.create(model="char-bundle", prompt="ret", max_tokens=25, temperature=0)
    assert answer.choices[0].text == expected and answer.usage.completion_tokens == 25
    chunks = client.completions.create(model="char-bundle", prompt="ret", max_tokens=25, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [m.id for m in client.models.list()] == ["char-bundle"]


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_tokens": 50}, "at most 11"),
    ({"prompt": "def f_1(x, y=1):\n    return x * 1 + y  # value 31\n"}, "at most 11"),
    ({"prompt": "x", "bytedeploy": {"ext": "py"}}, "is a bgpt option"),
    ({"prompt": "x", "bytedeploy": {"nonsense": 1}}, "nonsense"),
    ({"prompt": ["a", "b"]}, "one string"),
    ({"prompt": "x", "logprobs": 2}, "not supported"),
    ({"prompt": "x", "n": 2}, "batch size"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"prompt": "def", "max_tokens": 2, "bytedeploy": {"infill": "def x"}}, "hole"),
])
def test_bad_requests_are_400_with_an_openai_error_body(setup, body, message):
    r = setup[1]["bfn"].post(body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text


def test_other_bad_requests(setup):
    servers = setup[1]
    r = httpx.post(servers["bgpt"].url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = servers["bgpt"].post({"prompt": "x", "model": "other"})
    assert r.status_code == 404 and "not served here" in r.json()["error"]["message"]
    r = servers["bgpt"].post({"bytedeploy": {"prompt_base64": "***"}})
    assert r.status_code == 400 and "base64" in r.json()["error"]["message"]
    r = servers["bgpt"].post({"bytedeploy": {"input_base64": "AAAA", "input_ext": "abc"}})  # no target_ext
    assert r.status_code == 400 and "--to" in r.json()["error"]["message"]  # the family's own check, at its first step
    r = servers["bfn"].post({"prompt": "def f_1(x", "max_tokens": 10})  # each fits, together they do not
    assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]


SHORT = {"prompt": "def", "max_tokens": 2, "bytedeploy": {"n_steps": 2}}
LONG = {"prompt": "def", "max_tokens": 2, "bytedeploy": {"n_steps": 1_000_000}}  # minutes, unless cut short


def test_api_key_and_body_limit(setup):
    server = setup[1]["bfn"]
    assert server.post(SHORT, key=None).status_code == 401
    r = server.post(SHORT, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health, ready and metrics stay open
    assert server.post(SHORT).status_code == 200
    r = server.post(dict(SHORT, prompt="x" * 5000))
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_full_queue_429_and_a_client_that_goes_away_frees_its_row(setup):
    """One row (--max-batch 1) streams a long request, one request waits (--max-queue 1): the next gets 429. The
    streaming client goes away: its row leaves the batch at once and the waiting request runs."""
    server = setup[1]["bfn"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with server.open_stream(LONG) as r:
            assert r.status_code == 200
            queued = pool.submit(server.post, SHORT)
            while server.metrics()["bytedeploy_queue_depth"] < 1:
                time.sleep(0.01)
            assert server.metrics()["bytedeploy_running_batch_size"] == 1
            r = server.post(SHORT)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        assert queued.result().status_code == 200  # within its 1.5 s: the long request's row was freed
    assert server.metrics()["bytedeploy_running_batch_size"] == 0


def test_request_timeout_is_504(setup):
    server = setup[1]["bfn"]
    started = time.monotonic()
    r = server.post(LONG)  # longer than --request-timeout 1.5
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert time.monotonic() - started < 3
    counts = server.metrics()
    for status in ("200", "401", "429", "504"):
        assert counts[f'bytedeploy_requests_total{{"status": "{status}"}}'] >= 1
    assert server.metrics()["bytedeploy_running_batch_size"] == 0


def test_metrics_scraped_and_parsed(setup):
    server = setup[1]["bgpt"]
    before = server.metrics()
    r = server.post({"prompt": "import ", "max_tokens": 30, "temperature": 0})
    after = server.metrics()
    assert after['bytedeploy_requests_total{"status": "200"}'] == before.get(
        'bytedeploy_requests_total{"status": "200"}', 0) + 1
    assert after["bytedeploy_generated_tokens_total"] - before["bytedeploy_generated_tokens_total"] == \
        r.json()["usage"]["completion_tokens"] == 30
    assert after["bytedeploy_time_to_first_token_seconds_count"] == before[
        "bytedeploy_time_to_first_token_seconds_count"] + 1
    assert after["bytedeploy_time_per_output_token_seconds_count"] > before[
        "bytedeploy_time_per_output_token_seconds_count"]
    assert after["bytedeploy_queue_wait_seconds_count"] == before["bytedeploy_queue_wait_seconds_count"] + 1
    # 30 bytes from a 7-byte prompt: at least the patches of 37 bytes, each reported a step later
    assert after["bytedeploy_step_seconds_count"] - before["bytedeploy_step_seconds_count"] >= 37 // 8 + 1
    assert after["bytedeploy_queue_depth"] == 0 and after["bytedeploy_running_batch_size"] == 0
    assert after['bytedeploy_time_to_first_token_seconds_bucket{"le": "+Inf"}'] == after[
        "bytedeploy_time_to_first_token_seconds_count"]


def test_serve_load_benchmark(setup, tmp_path):
    from bytedeploy.benchmarks import serve_load

    server = setup[1]["bgpt"]
    result = serve_load.main(["--url", server.url, "--clients", "1,3", "--requests", "2", "--max-tokens", "24",
                              "--processes", "2", "--out", str(tmp_path / "load.json"),
                              "--plot", str(tmp_path / "load.png")])
    assert json.loads((tmp_path / "load.json").read_text()) == result
    assert result["family"] == "bgpt" and result["unit"] == "byte"
    for level, clients in zip(result["levels"], (1, 3)):  # 3 clients: in two processes (2 + 1)
        assert level["clients"] == clients and level["requests"] == 2 * clients and level["errors"] == 0
        assert level["processes"] == min(clients, 2)
        assert level["tokens"] == 24 * level["requests"] and level["tokens_per_s"] > 0
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"] and 0 < level["per_token_p50_ms"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        serve_load.main(["--url", "http://example.com:8000"])  # only a server on this machine


def test_sigterm_lets_a_stream_in_flight_finish(setup):
    paths, servers = setup
    server = servers["bundle"]
    expected = offline(paths["bundle"], b"def ", 400).decode()
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "def ", "max_tokens": 400, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        text = json.loads(next(lines)[len("data: "):])["choices"][0]["text"]
        server.process.send_signal(signal.SIGTERM)
        rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert text + "".join(json.loads(d)["choices"][0]["text"] for d in rest[:-1]) == expected
    assert server.process.wait(30) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


def test_a_server_whose_model_process_dies_stops_with_one_error_line(setup):
    """The model process killed: the workers are stopped and the command exits 1 with one Error line."""
    paths, _ = setup
    server = Server(paths["bundle"], "--max-batch", "2").wait_ready()
    try:
        while "model process" not in (line := server.process.stdout.readline()):
            assert line, "the server did not name its model process"
        os.kill(int(re.search(r"model process (\d+)", line).group(1)), signal.SIGKILL)
        assert server.process.wait(30) == 1
        errors = [line for line in server.process.stdout.read().splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "bytedeploy-model (exit code -9) ended on its own" in errors[0]
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


@pytest.mark.slow
def test_bundles_served_by_the_deploy_install(deploy_venv, tiny_bundles):
    """The deploy install (no torch): bGPT's and char GPT-2's bundles served, plain and streamed, as generate()."""
    installed = (deploy_venv.parent / "bytedeploy",)  # the deploy install's console script
    servers = {name: Server(tiny_bundles[name][1], launcher=installed) for name in ("bgpt", "char-gpt2")}
    try:
        for name, server in servers.items():
            server.wait_ready()
            expected = offline(tiny_bundles[name][1], b"def ", 30)
            body = {"prompt": "def ", "max_tokens": 30, "temperature": 0}
            assert answer_bytes(server.post(body).json()["choices"][0]) == expected
            assert streamed_bytes(server.stream(body)) == expected
    finally:
        for server in servers.values():
            server.stop()


def stream_pieces(updates: list) -> list[str]:
    """Completion.events over one job's queued updates, without a server -> the pieces it yields (one write each)."""
    import asyncio
    from types import SimpleNamespace

    from bytedeploy.runner import Limits
    from bytedeploy.serve.api import CompletionRequest
    from bytedeploy.serve.app import Completion
    from bytedeploy.serve.metrics import Metrics
    from bytedeploy.serve.scheduler import Job

    async def stream() -> list[str]:
        model = SimpleNamespace(limits=Limits(64, 64, "byte"), count_tokens=len)
        scheduler = SimpleNamespace(cancel=lambda job: None)
        request = GenerateRequest(b"x", 6, 1, SamplingConfig(temperature=0.0), {})
        job = Job(request)
        completion = Completion(model, scheduler, Metrics(), CompletionRequest(prompt="x", max_tokens=6, stream=True),
                                request, [job], "m", time.monotonic() + 10)
        for update in updates:
            job.updates.put_nowait(update)
        first = [await completion.next_update(0)]
        return [e async for e in completion.events(first, [completion.take(0, first[0])])]

    return asyncio.run(stream())


def piece_events(piece: str) -> list[dict]:
    return [json.loads(e[len("data: "):]) for e in piece.split("\n\n") if e and "[DONE]" not in e]


def test_a_stream_sends_updates_that_queued_up_as_one_chunk():
    """Steps that ended while the event loop was busy reach a streaming client as one chunk, not one per step; the
    stream's end (the last event and [DONE]) is one piece: one write, where the client waits for it."""
    from bytedeploy.generation import RowUpdate

    pieces = stream_pieces([RowUpdate(0, b"ab"), RowUpdate(0, b"cd"), RowUpdate(0, b"ef", done=True, output=b"abcdef")])
    assert len(pieces) == 2 and pieces[1].endswith("data: [DONE]\n\n")
    chunks = [event for piece in pieces for event in piece_events(piece)]
    assert [c["choices"][0]["text"] for c in chunks] == ["ab", "cdef"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]


def test_a_stream_that_fails_midway_ends_with_its_error_in_one_piece():
    from bytedeploy.errors import UserError
    from bytedeploy.generation import RowUpdate

    pieces = stream_pieces([RowUpdate(0, b"ab"), RowUpdate(0, done=True, error=UserError("the row failed"))])
    assert len(pieces) == 2 and pieces[1].endswith("data: [DONE]\n\n")
    assert piece_events(pieces[0])[0]["choices"][0]["text"] == "ab"
    assert piece_events(pieces[1]) == [{"error": {"message": "the row failed", "type": "invalid_request_error",
                                                  "param": None, "code": None}}]
