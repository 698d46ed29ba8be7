"""`bytedeploy serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one scheduler per model.

    POST /v1/completions   OpenAI completions: prompt, max_tokens, temperature, top_p, top_k (extension), seed,
                           stop, n, stream (server-sent events ending in "data: [DONE]"); usage counts; family
                           options in the "bytedeploy" field (serve/api.py)
    GET  /v1/models        the one model served
    GET  /health           200 while the server is up
    GET  /ready            200 while the model (loaded and warmed before any worker serves) runs, else 503
    GET  /metrics          Prometheus: requests by status, tokens generated, queue depth, running batch size,
                           time to first token and per-token latency histograms

Errors are OpenAI-style JSON bodies ({"error": {"message", "type", "param", "code"}}), never a stack trace: 400 for
a bad request (one beyond the model's limits too), 401 without the --api-key's Bearer token (compared in constant
time; /health, /ready and /metrics stay open), 413 past the body limit (FastAPI's max_body_size), 429 with
Retry-After when the queue is full, 503 once the model's process has died (workers start once it is warm), 504
past the per-request timeout. It binds 127.0.0.1 unless told otherwise.
Processes: the main one (run: starts the others, waits for a signal), the model process (scheduler.py) and
--workers HTTP workers (uvicorn on the main process's socket). SIGTERM or Ctrl-C: each worker stops accepting
connections and waits for its requests in flight to finish, then the model process stops and the server exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from http import HTTPStatus
from multiprocessing.connection import wait
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest, multiprocess
from starlette.exceptions import HTTPException

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest
from bytedeploy.serve.api import EXTENSION, ChoiceText, CompletionRequest, generate_requests
from bytedeploy.serve.metrics import Metrics
from bytedeploy.serve.scheduler import STOP_SECONDS, Job, ModelClient, ModelProcess, ModelSpec, QueueFull

BEARER = HTTPBearer(auto_error=False)  # Authorization: Bearer KEY, checked by create_app's authorized()


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # rows in the running batch
    max_queue: int = 64  # requests (choices) waiting to join it; more get 429
    api_key: str | None = None
    request_timeout: float = 300.0  # seconds from arrival to the last byte of the answer
    max_body_bytes: int = 1 << 20
    model_name: str = ""  # the id /v1/models reports [the folder's name]
    workers: int = 1  # HTTP worker processes


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error", 503: "server_unavailable",
            504: "timeout_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class CountStatus:
    """ASGI middleware: counts the responses to /v1 by status code (bytedeploy_requests_total), and gives the 413
    of FastAPI's body limit (which Starlette answers in plain text) the OpenAI-style JSON body of every other error."""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        too_large = False

        async def counted_send(message):
            nonlocal too_large
            if message["type"] == "http.response.start":
                self.counter.labels(str(message["status"])).inc()
                too_large = message["status"] == 413
                if too_large:
                    return
            elif too_large:  # the plain-text body: replaced once, by the JSON error's whole response
                if not message.get("more_body", False):
                    body = json.dumps(error_body(413, "the request body is larger than the server's --max-body"))
                    await send({"type": "http.response.start", "status": 413,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body.encode()})
                return
            await send(message)

        await self.app(scope, receive, counted_send)


def create_app(client: ModelClient, config: ServeConfig) -> CountStatus:
    """The ASGI app of one HTTP worker, serving the model (warmed up already) through client. The FastAPI app sits
    inside CountStatus, which sees every response, the body limit's 413 included."""
    model, metrics = client.model, client.metrics  # model: a bytedeploy.runner.ModelCard
    name = config.model_name or model.path.name

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        client.start()
        # anyio imports its asyncio backend at its first use, a streaming response's: here, not in the worker's first
        # request (~20 ms of it on a 2-core CI machine)
        await anyio.sleep(0)
        orphaned = asyncio.create_task(stop_when_orphaned())
        yield
        orphaned.cancel()
        await client.stop()

    app = FastAPI(title="bytedeploy", lifespan=lifespan, max_body_size=config.max_body_bytes)

    async def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        # async: FastAPI runs a plain def dependency in its thread pool, a thread hop on every request
        if config.api_key is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        if not secrets.compare_digest(given, config.api_key.encode()):
            raise HTTPException(401, "a valid API key is needed: Authorization: Bearer KEY",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = e.detail if isinstance(e.detail, str) else HTTPStatus(e.status_code).phrase
        return error_response(e.status_code, message, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error_response(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), where or None)

    @app.exception_handler(UserError)
    async def bad_request(request: Request, e: UserError):
        return error_response(400, str(e))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def is_ready():
        if not client.alive:
            return error_response(503, "the model process has exited")
        return {"status": "ready", "model": name, "family": model.family, "backend": model.label}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(every_process(metrics)), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "bytedeploy",
                                            "family": model.family, "backend": model.label}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        if not client.alive:
            return error_response(503, "the model process has exited")
        if body.model not in (None, name):
            return error_response(404, f"model {body.model!r} is not served here; /v1/models lists {name!r}",
                                  "model")
        if body.n > config.max_batch:
            return error_response(400, f"n is at most the batch size, {config.max_batch}", "n")
        requests = generate_requests(body, model.family, model.limits.max_new)
        for r in requests:
            model.check(r)
        try:
            jobs = client.submit(requests)
        except QueueFull as e:
            return error_response(429, f"the server is busy: {e}", headers={"Retry-After": "1"})
        completion = Completion(model, client, metrics, body, requests[0], jobs, name,
                                time.monotonic() + config.request_timeout)
        if body.stream:
            return await completion.stream()
        return await completion.answer(request)

    return CountStatus(app, metrics.requests)


class Completion:
    """One /v1/completions call: its jobs (one per choice), their texts and the response."""

    def __init__(self, model, client: ModelClient, metrics: Metrics, body: CompletionRequest,
                 request: GenerateRequest, jobs: list[Job], name: str, deadline: float):
        from bytedeploy.serve.api import stop_strings

        self.model, self.client, self.metrics, self.body, self.jobs = model, client, metrics, body, jobs
        self.texts = [ChoiceText(stop_strings(body)) for _ in jobs]
        self.outputs = [bytearray() for _ in jobs]
        self.prompt_tokens = model.count_tokens(request.prompt) + len(request.options.get("input_data") or b"")
        self.max_new = request.max_new or model.limits.max_new
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created, self.name, self.deadline = int(time.time()), name, deadline

    def cancel(self) -> None:
        for job in self.jobs:
            self.client.cancel(job)

    async def next_update(self, i: int):
        """Choice i's next RowUpdate; TimeoutError past the deadline."""
        return await asyncio.wait_for(self.jobs[i].updates.get(), max(self.deadline - time.monotonic(), 0.0))

    def take(self, i: int, update) -> str:
        """Choice i's update -> the text it adds; a stop string cancels the job."""
        if update.error is not None:
            raise update.error
        self.outputs[i] += update.new
        text = self.texts[i].feed(update.new, final=update.done)
        if self.texts[i].stopped:
            self.client.cancel(self.jobs[i])
        return text

    def finish_reason(self, i: int) -> str:
        """"length" when the choice made all the tokens it could, else "stop" (a stop string, bGPT's end mark)."""
        made_all = self.model.count_tokens(bytes(self.outputs[i])) >= self.max_new
        return "length" if made_all and not self.texts[i].stopped else "stop"

    def usage(self) -> dict:
        completion_tokens = sum(self.model.count_tokens(bytes(o)) for o in self.outputs)
        self.metrics.tokens.inc(completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def choice(self, i: int, text: str, finish_reason: str | None, data: bytes) -> dict:
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if self.model.limits.unit == "byte" and not self.texts[i].stops and text.encode("utf-8") != data:
            choice[EXTENSION] = {"output_base64": base64.b64encode(data).decode("ascii")}
        return choice

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.name,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def answer(self, request: Request) -> JSONResponse:
        """The whole completion as one JSON body; the jobs are cancelled if the client goes away first."""
        collect = asyncio.ensure_future(self.collect())
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
                self.cancel()
        if not collect.done() or collect.cancelled():
            return error_response(499, "the client closed the request")
        try:
            texts = collect.result()
        except TimeoutError:
            return error_response(504, "the request took longer than the server's --request-timeout")
        choices = [self.choice(i, text, self.finish_reason(i), bytes(self.outputs[i])) for i, text in enumerate(texts)]
        return JSONResponse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.name,
                             "choices": choices, "usage": self.usage()})

    async def collect(self) -> list[str]:
        texts = []
        try:
            for i in range(len(self.jobs)):
                parts = []
                while True:
                    update = await self.next_update(i)
                    parts.append(self.take(i, update))
                    if update.done or self.texts[i].stopped:
                        break
                texts.append("".join(parts))
        except BaseException:
            self.cancel()
            raise
        return texts

    async def stream(self):
        """Server-sent events: the first step's output is awaited before the response starts, so that a request
        the model refuses (a UserError when its loop plans it) is still a 400."""
        try:
            first = [await self.next_update(i) for i in range(len(self.jobs))]
            texts = [self.take(i, update) for i, update in enumerate(first)]
        except TimeoutError:
            self.cancel()
            return error_response(504, "the request took longer than the server's --request-timeout")
        except BaseException:
            self.cancel()
            raise
        return StreamingResponse(self.events(first, texts), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def events(self, first: list, texts: list[str]):
        """The stream's events; those of updates that came together go out in one piece. The stream's end (the last
        events, the usage chunk and [DONE], or an error and [DONE]) goes out in one piece too: a client reads to the
        end of a stream before it sends its next request, so each write there is on its path."""
        pending = {}  # choice -> task reading its next update (several choices)
        held = ""  # events not sent yet: sent with the next events, or as the stream's end
        try:
            held = "".join(self.event(i, update, text) for i, (update, text) in enumerate(zip(first, texts)))
            running = [i for i, update in enumerate(first) if not (update.done or self.texts[i].stopped)]
            if running and held:
                yield held
                held = ""
            if len(self.jobs) == 1:  # the usual request: its updates in order, no task per update
                queue, finished = self.jobs[0].updates, not running
                while not finished:
                    update = await self.next_update(0)
                    text = self.take(0, update)
                    while not (update.done or self.texts[0].stopped or queue.empty()):
                        # steps that ended while the loop was busy: one chunk, fewer events when the server is loaded
                        more = queue.get_nowait()
                        text += self.take(0, more)
                        update = replace(more, new=update.new + more.new)
                    held += self.event(0, update, text)
                    finished = update.done or self.texts[0].stopped
                    if not finished and held:
                        yield held
                        held = ""
            else:
                pending = {i: asyncio.ensure_future(self.next_update(i)) for i in running}
            while pending:
                done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
                for i in [i for i, task in pending.items() if task in done]:
                    update = pending.pop(i).result()
                    held += self.event(i, update, self.take(i, update))
                    if not (update.done or self.texts[i].stopped):
                        pending[i] = asyncio.ensure_future(self.next_update(i))
                if pending and held:
                    yield held
                    held = ""
            usage = self.usage()
            if self.body.stream_options and self.body.stream_options.include_usage:
                held += self.chunk([], usage)
        except TimeoutError:
            held += f"data: {json.dumps(error_body(504, 'the request took longer than --request-timeout'))}\n\n"
        except UserError as e:
            held += f"data: {json.dumps(error_body(400, str(e)))}\n\n"
        except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in it
            held += f"data: {json.dumps(error_body(500, f'internal error: {type(e).__name__}'))}\n\n"
        finally:
            for task in pending.values():
                task.cancel()
            self.cancel()  # finished jobs are left alone; a client gone mid-stream cancels the rest
        yield held + "data: [DONE]\n\n"

    def event(self, i: int, update, text: str) -> str:
        """Choice i's chunk for an update; '' for a step that added nothing (a BFN step before the last)."""
        finished = update.done or self.texts[i].stopped
        if not (text or update.new or finished):
            return ""
        return self.chunk([self.choice(i, text, self.finish_reason(i) if finished else None, update.new)])


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away (its body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def every_process(metrics: Metrics):
    """A registry of every server process's metrics (prometheus_client's multiprocess mode, which `bytedeploy
    serve` turns on), or of this process's alone."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return metrics.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


async def stop_when_orphaned() -> None:
    """A worker whose main process is gone (killed) shuts down as on SIGTERM, rather than hold the port."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound now (UserError when the address cannot be: in use, not this machine's), listened
    on once the workers start."""
    sock = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
    except OSError as e:
        if sock is not None:
            sock.close()
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(spec: ModelSpec, config: ServeConfig, sock: socket.socket, echo=print) -> None:
    """The server's main process: the model process, then config.workers HTTP workers on sock; until SIGTERM or
    Ctrl-C, when each worker stops taking connections and lets its requests in flight finish (none outlives its
    --request-timeout), then the model process ends. UserError when the model cannot be opened, or when a server
    process ends on its own (the others are stopped first)."""
    metrics_dir = tempfile.mkdtemp(prefix="bytedeploy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the processes started below
    try:
        model = ModelProcess(spec, config.max_batch, config.workers)
        echo(f"serving {model.card.family} {model.card.path} on {model.card.label} at "
             f"http://{config.host}:{config.port}/v1 ({config.workers} HTTP worker{'s' * (config.workers > 1)}, "
             f"model process {model.process.pid})")
        sock.listen(2048)
        context = multiprocessing.get_context("spawn")
        queue_share = -(-config.max_queue // config.workers)
        workers = [context.Process(target=http_worker, name=f"bytedeploy-http-{i}",
                                   args=(config, model.card, *ends, queue_share, sock))
                   for i, ends in enumerate(model.worker_ends)]
        for worker in workers:
            worker.start()
        for conn in (c for ends in model.worker_ends for c in ends):
            conn.close()
        sock.close()
        stopped_by, ended = supervise(workers, model.process)
        model.join()
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if ended:
        raise UserError(f"the server stopped: {ended} ended on its own")
    if stopped_by is not None:  # as uvicorn does: the signal's own ending, once the server has shut down
        signal.signal(stopped_by, signal.SIG_DFL)
        signal.raise_signal(stopped_by)


def supervise(workers: list, model_process) -> tuple[int | None, str]:
    """Until SIGTERM or Ctrl-C, or a process's end on its own: then each worker gets SIGTERM (uvicorn's graceful
    shutdown) and is waited for. -> (the signal that stopped the server, the processes that ended on their own)."""
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _: stop.append(number))
    processes = (*workers, model_process)
    fired = []
    while not stop and not (fired := wait([p.sentinel for p in processes], timeout=0.2)):
        pass
    gone = [p for p in processes if p.sentinel in fired]
    for p in gone:  # its sentinel fires as its files close, a moment before its exit code is there
        p.join(STOP_SECONDS)
    ended = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in gone)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        worker.join()
        multiprocess.mark_process_dead(worker.pid)
    return (stop[0] if stop else None), ended


def http_worker(config: ServeConfig, card, commands, replies, max_queue: int, sock: socket.socket) -> None:
    """One HTTP worker process: uvicorn on the shared socket, its requests to the model process."""
    import uvicorn

    app = create_app(ModelClient(card, commands, replies, max_queue), config)
    # uvicorn runs on uvloop and httptools where they are installed (the deploy install has them): its event loop is
    # a worker's busiest thread under load
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           access_log=False, timeout_graceful_shutdown=int(config.request_timeout) + 1))
    server.run(sockets=[sock])
