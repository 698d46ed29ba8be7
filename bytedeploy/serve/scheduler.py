"""One scheduler per model: continuous batching over the model's batch session (bytedeploy.runner), in a process of
its own, fed by the server's HTTP worker processes.

The model process opens the model, warms it up (its first request: lazy initialisation, graph capture) and owns its
session. Between two steps it takes waiting jobs into the batch while it has room (a job joins at the next step:
bGPT's next patch) and drops the rows of cancelled jobs; after each step it sends every row's update to the worker
that submitted it. A job leaves the batch when its row is done. The HTTP workers never run the model: with both in
one process, one GIL served both, and the event loop's work under load slowed every step (docs/performance.md,
serve). Each worker has its own pair of pipes to the model process; its event loop reads the replies as they come
(no thread between them). A worker's queue of waiting jobs is bounded: submit raises QueueFull, which the server
answers with 429.

    HTTP worker (ModelClient)                model process (run_model; only it imports torch, for a checkpoint)
                                             opens and warms the model -> ("ready", ModelCard) or ("failed", why)
    submit(requests)  --("add", jobs)-->     waiting; each joins the batch at the next step with room
    cancel(job)       --("cancel", id)-->    leaves the queue or the batch before the next step
    read() on the loop <--("step", ...)--    that worker's jobs admitted, (job id, new bytes, done, error) per row
    stop()            --("stop",)-->         finishes that worker's jobs, then ("stopped",); with every worker
                                             stopped (or gone) it exits
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, RowUpdate
from bytedeploy.sampling import SamplingConfig
from bytedeploy.serve.metrics import Metrics

STOP_SECONDS = 30.0  # how long the model process may take to finish its jobs and exit once every worker has stopped


class QueueFull(Exception):
    """No room in the queue of waiting jobs."""


@dataclass
class ModelSpec:
    """What the model process opens: bytedeploy.runner.open_model's arguments."""

    path: str
    backend: str | None = None
    device: str = "auto"
    dtype: str = "float32"


@dataclass
class Job:
    request: GenerateRequest
    id: int = 0
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # RowUpdates
    submitted: float = field(default_factory=time.monotonic)  # one clock in every process (CLOCK_MONOTONIC)
    admitted: bool = False  # it joined the batch
    last_update: float | None = None  # when it last received output (per-token latency)


class ModelProcess:
    """The model process, started by the server's main process with one pair of pipes per HTTP worker."""

    def __init__(self, spec: ModelSpec, max_batch: int, n_workers: int):
        """Starts it and waits while it opens and warms the model: UserError when it cannot."""
        context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
        self.worker_ends, model_ends = [], []  # per worker: (commands' sending end, replies' receiving end)
        for _ in range(n_workers):
            commands_in, commands_out = context.Pipe(duplex=False)
            replies_in, replies_out = context.Pipe(duplex=False)
            self.worker_ends.append((commands_out, replies_in))
            model_ends.append((commands_in, replies_out))
        status_in, status_out = context.Pipe(duplex=False)
        self.process = context.Process(target=run_model, args=(spec, max_batch, model_ends, status_out),
                                       name="bytedeploy-model")
        self.process.start()
        for conn in (status_out, *(c for pair in model_ends for c in pair)):
            conn.close()
        try:
            reply = status_in.recv()
        except EOFError:
            self.process.join()
            reply = ("failed", f"the model process exited (code {self.process.exitcode}) while opening {spec.path}")
        except BaseException:  # Ctrl-C while loading
            self.process.kill()
            self.process.join()
            raise
        if reply[0] == "failed":
            self.process.join(STOP_SECONDS)
            raise UserError(reply[1])
        self.card = reply[1]  # the model's bytedeploy.runner.ModelCard: family, label, limits, count_tokens

    def join(self) -> None:
        """Once every worker has stopped: wait for it to finish, kill it past STOP_SECONDS."""
        self.process.join(STOP_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class ModelClient:
    """An HTTP worker's side: its jobs go to the model process, each step's updates come back to their queues.
    Everything runs on the worker's event loop."""

    def __init__(self, card, commands, replies, max_queue: int):
        self.model, self.commands, self.replies, self.max_queue = card, commands, replies, max_queue
        self.metrics = Metrics()
        self.jobs: dict[int, Job] = {}  # submitted, not done and not cancelled
        self.next_id = 0
        self.alive = True  # the model process runs
        self.stopped: asyncio.Future | None = None

    def start(self) -> None:
        """On the event loop: read the model process's replies as they come."""
        self.stopped = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self.replies.fileno(), self.read)

    async def stop(self) -> None:
        """Let the model process finish this worker's jobs, then stop reading."""
        self.send(("stop",))
        try:
            await asyncio.wait_for(asyncio.shield(self.stopped), STOP_SECONDS)
        except TimeoutError:
            pass

    def submit(self, requests: list[GenerateRequest]) -> list[Job]:
        """Queue the requests as jobs, all or none (QueueFull)."""
        if not self.alive:
            raise RuntimeError("the model process has exited")
        waiting = self.n_waiting()
        if waiting + len(requests) > self.max_queue:
            raise QueueFull(f"{waiting} requests are waiting (--max-queue {self.max_queue})")
        jobs = [Job(request, self.next_id + i) for i, request in enumerate(requests)]
        self.next_id += len(jobs)
        self.jobs.update((job.id, job) for job in jobs)
        self.metrics.queue_depth.set(waiting + len(jobs))
        self.send(("add", [(job.id, job.request, job.submitted) for job in jobs]))
        return jobs

    def cancel(self, job: Job) -> None:
        """The job leaves the queue or the batch before its next step (a finished job is left alone)."""
        if self.jobs.pop(job.id, None) is not None:
            self.send(("cancel", job.id))

    def n_waiting(self) -> int:
        return sum(not job.admitted for job in self.jobs.values())

    def send(self, command: tuple) -> None:
        try:
            self.commands.send(command)
        except OSError:  # the model process is gone: read() fails the jobs
            pass

    def read(self) -> None:
        """The replies that have come, each step's updates to their jobs; until the model process stops or dies."""
        try:
            while self.replies.poll():
                message = self.replies.recv()
                if message[0] == "stopped":
                    return self.close()
                self.deliver(*message[1:])
        except (EOFError, OSError):
            self.close()
            self.alive = False
            jobs, self.jobs = list(self.jobs.values()), {}
            for job in jobs:
                job.updates.put_nowait(RowUpdate(job.id, done=True, error=RuntimeError("the model process exited")))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.replies.fileno())
        if not self.stopped.done():
            self.stopped.set_result(None)

    def deliver(self, admitted: list[int], updates: list[tuple]) -> None:
        now = time.monotonic()
        for job_id in admitted:
            if (job := self.jobs.get(job_id)) is not None:
                job.admitted = True
        for job_id, new, done, error in updates:
            job = self.jobs.pop(job_id, None) if done else self.jobs.get(job_id)
            if job is None:  # cancelled
                continue
            if new or done:
                if job.last_update is None:
                    self.metrics.time_to_first_token.observe(now - job.submitted)
                elif new:
                    tokens = max(self.model.count_tokens(new), 1)
                    self.metrics.time_per_output_token.observe((now - job.last_update) / tokens)
                job.last_update = now
            job.updates.put_nowait(RowUpdate(job_id, new, done, error=error))
        self.metrics.queue_depth.set(self.n_waiting())


# ------------------------------------------------------------------------------------------------- model process


def run_model(spec: ModelSpec, max_batch: int, workers: list[tuple], status) -> None:
    """The model process: open and warm up the model, say so on status, then run its batch for the workers' pipes
    until every worker has stopped or gone."""
    # Ctrl-C and SIGTERM are for the server's processes: the workers let the requests in flight finish, then stop this
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        session, card = open_session(spec, max_batch)
        warm_up(session, card.family)
        status.send(("ready", card))
    except UserError as e:
        return status.send(("failed", str(e)))
    status.close()
    ModelLoop(session, max_batch, workers).run()


def open_session(spec: ModelSpec, max_batch: int):
    """The model's batch session and card; UserError when it cannot be opened or cannot batch."""
    from bytedeploy.runner import open_model

    try:
        model = open_model(spec.path, spec.backend, spec.device, spec.dtype)
        return model.session(max_batch), model.card()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to open is the command's one-line error
        traceback.print_exc()
        raise UserError(f"cannot open {spec.path}: {type(e).__name__}: {e}") from None


def warm_up(session, family: str) -> None:
    """The model's first request (lazy initialisation, graph capture), before any worker serves; UserError when the
    model cannot generate."""
    options = {"n_steps": 1} if family == "bfn" else {}
    try:
        row = session.add(GenerateRequest(b"", 1, 1, SamplingConfig(temperature=0.0), options))
        while not any(update.row == row and update.done for update in updates_or_error(session.step())):
            pass
    except Exception as e:  # noqa: BLE001 - the command's one-line error
        traceback.print_exc()
        raise UserError(f"the model cannot generate: {type(e).__name__}: {e}") from None


def updates_or_error(updates: list[RowUpdate]) -> list[RowUpdate]:
    for update in updates:
        if update.error is not None:
            raise update.error
    return updates


class ModelLoop:
    """The model process's loop: the workers' commands between steps, each step's updates out to their workers."""

    def __init__(self, session, max_batch: int, workers: list[tuple]):
        self.session, self.max_batch, self.metrics = session, max_batch, Metrics()
        self.workers = dict(enumerate(workers))  # worker -> (commands, replies), while it is served
        self.stopping: set[int] = set()  # workers that asked to stop
        self.waiting: dict[tuple, tuple] = {}  # (worker, job id) -> (request, submitted), in order of arrival
        self.running: dict[int, tuple] = {}  # session row -> (worker, job id)

    def run(self) -> None:
        while True:
            self.release_stopped()
            if not self.workers:
                return
            idle = not self.waiting and not len(self.session)
            # commands that came during the step; with nothing to do, wait for one
            for conn in wait([commands for commands, _ in self.workers.values()], None if idle else 0):
                worker = next(w for w, (commands, _) in self.workers.items() if commands is conn)
                try:
                    while conn.poll():
                        self.obey(worker, conn.recv())
                except (EOFError, OSError):  # the worker is gone: its jobs with it
                    self.drop(worker)
            admitted, updates = self.admit()
            if len(self.session):
                start = time.perf_counter()
                updates += self.step()
                self.metrics.step_time.observe(time.perf_counter() - start)
            self.metrics.running_batch_size.set(len(self.session))
            self.send(admitted, updates)

    def obey(self, worker: int, command: tuple) -> None:
        if command[0] == "add":
            for job_id, request, submitted in command[1]:
                self.waiting[worker, job_id] = (request, submitted)
        elif command[0] == "cancel":
            self.leave((worker, command[1]))
        elif command[0] == "stop":
            self.stopping.add(worker)

    def leave(self, job: tuple) -> None:
        """A job leaves the queue or the batch (a finished one is gone already)."""
        if self.waiting.pop(job, None) is None:
            row = next((row for row, j in self.running.items() if j == job), None)
            if row is not None:
                self.session.cancel(row)
                del self.running[row]

    def drop(self, worker: int) -> None:
        for job in [job for job in (*self.waiting, *self.running.values()) if job[0] == worker]:
            self.leave(job)
        self.workers.pop(worker)
        self.stopping.discard(worker)

    def release_stopped(self) -> None:
        """Workers that asked to stop and have no job left: told so, and no longer served."""
        busy = {worker for worker, _ in (*self.waiting, *self.running.values())}
        for worker in self.stopping - busy:
            try:
                self.workers[worker][1].send(("stopped",))
            except OSError:
                pass
            self.drop(worker)

    def admit(self) -> tuple[list, list]:
        """Waiting jobs join while there is room -> [(worker, job id)], [failure updates of jobs refused]."""
        admitted, refused = [], []
        while self.waiting and len(self.session) < self.max_batch:
            job = next(iter(self.waiting))
            request, submitted = self.waiting.pop(job)
            try:
                self.running[self.session.add(request)] = job
            except Exception as e:  # noqa: BLE001 - a request the session refuses fails alone
                refused.append((job, b"", True, portable(e)))
                continue
            admitted.append(job)
            self.metrics.queue_wait.observe(time.monotonic() - submitted)
        return admitted, refused

    def step(self) -> list[tuple]:
        """One step of every row -> [((worker, job id), new bytes, done, error)]."""
        try:
            updates = self.session.step()
        except Exception as e:  # noqa: BLE001 - the step failed for every row: each gets the error, none stays
            updates = [RowUpdate(row, done=True, error=e) for row in self.running]
            for row in self.running:
                self.session.cancel(row)
        out = []
        for update in updates:
            job = self.running.pop(update.row, None) if update.done else self.running.get(update.row)
            if job is not None:
                out.append((job, update.new, update.done, portable(update.error)))
        return out

    def send(self, admitted: list[tuple], updates: list[tuple]) -> None:
        """Each worker its jobs' part of the step: one message."""
        parts = collections.defaultdict(lambda: ([], []))
        for worker, job_id in admitted:
            parts[worker][0].append(job_id)
        for (worker, job_id), *rest in updates:
            parts[worker][1].append((job_id, *rest))
        for worker, (admitted_ids, worker_updates) in parts.items():
            try:
                self.workers[worker][1].send(("step", admitted_ids, worker_updates))
            except (KeyError, OSError):  # the worker is gone
                pass


def portable(error: Exception | None) -> Exception | None:
    """An error as it crosses to a worker: a UserError (the request's fault, a 400) keeps its message; any other is
    logged here and becomes a RuntimeError naming its type (a 500)."""
    if error is None or type(error) is UserError:
        return error
    if isinstance(error, UserError):
        return UserError(str(error))
    traceback.print_exception(error)
    return RuntimeError(f"{type(error).__name__}: {error}")
