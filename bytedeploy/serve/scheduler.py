"""One scheduler per model: continuous batching over the model's batch session (bytedeploy.runner), with the model in
a process of its own.

The model process opens the model and owns its session. Between two steps it takes waiting jobs into the batch while
it has room (a job joins at the next step: bGPT's next patch) and drops the rows of cancelled jobs; after each step
it sends every row's update back. A job leaves the batch when its row is done. The server's process (HTTP on the
event loop) never runs the model: with both in one process, one GIL served both, and the event loop's work under
load slowed every step (docs/performance.md, serve). In the server's process a reader thread hands each step's
updates to the jobs' asyncio queues, one event-loop wake-up per step. The queue of waiting jobs is bounded: submit
raises QueueFull, which the server answers with 429.

    server's process                         model process (spawned; only it imports torch, for a checkpoint)
    Scheduler(spec, ...)                     opens the model -> ("ready", its ModelCard) or ("failed", message)
    submit(requests)  --("add", jobs)-->     waiting; each joins the batch at the next step with room
    cancel(job)       --("cancel", id)-->    leaves the queue or the batch before the next step
    reader thread     <--("step", ...)--     jobs admitted, (job id, new bytes, done, error) per row, step seconds
    stop()            --("stop",)-->         finishes the jobs it has, then ("stopped",) and exits
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field

from bytedeploy.errors import UserError
from bytedeploy.generation import GenerateRequest, RowUpdate
from bytedeploy.serve.metrics import Metrics

STOP_SECONDS = 30.0  # how long stop() waits for the model process to finish its jobs and exit before killing it


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
    loop: asyncio.AbstractEventLoop
    id: int = 0
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # RowUpdates, read on the event loop
    submitted: float = field(default_factory=time.monotonic)  # one clock in both processes (CLOCK_MONOTONIC)
    admitted: bool = False  # it joined the batch
    cancelled: bool = False
    last_update: float | None = None  # when it last received output (per-token latency)


class Scheduler:
    """The server's side: jobs go to the model process, each step's updates come back to their jobs' queues."""

    def __init__(self, spec: ModelSpec, max_batch: int, max_queue: int):
        """Starts the model process and waits while it opens the model: UserError when it cannot."""
        self.max_batch, self.max_queue, self.metrics = max_batch, max_queue, Metrics()
        self.lock = threading.Lock()  # over jobs, next_id, alive, stopped
        self.sending = threading.Lock()  # over commands
        context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
        self.replies, child_replies = context.Pipe(duplex=False)
        child_commands, self.commands = context.Pipe(duplex=False)
        self.process = context.Process(target=run_model, args=(spec, max_batch, child_commands, child_replies),
                                       name="bytedeploy-model")
        self.process.start()
        child_commands.close()
        child_replies.close()
        try:
            reply = self.replies.recv()
        except EOFError:
            self.process.join()
            reply = ("failed", f"the model process exited (code {self.process.exitcode}) while opening {spec.path}")
        except BaseException:  # Ctrl-C while loading
            self.process.kill()
            self.process.join()
            raise
        if reply[0] == "failed":
            self.end_process()
            raise UserError(reply[1])
        self.model = reply[1]  # the model's bytedeploy.runner.ModelCard: family, label, limits, count_tokens
        self.jobs: dict[int, Job] = {}  # submitted, not done and not cancelled
        self.next_id = 0
        self.alive = True  # the model process runs
        self.stopped = False
        self.reader = threading.Thread(target=self.read, name="bytedeploy-updates", daemon=True)
        self.reader.start()

    def submit(self, requests: list[GenerateRequest]) -> list[Job]:
        """Queue the requests as jobs, all or none (QueueFull)."""
        loop = asyncio.get_running_loop()
        with self.lock:
            if not self.alive:
                raise RuntimeError("the model process has exited")
            waiting = self.n_waiting()
            if waiting + len(requests) > self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (--max-queue {self.max_queue})")
            jobs = [Job(request, loop, self.next_id + i) for i, request in enumerate(requests)]
            self.next_id += len(jobs)
            self.jobs.update((job.id, job) for job in jobs)
            self.metrics.queue_depth.set(waiting + len(jobs))
        self.send(("add", [(job.id, job.request) for job in jobs]))
        return jobs

    def cancel(self, job: Job) -> None:
        """The job leaves the queue or the batch before its next step (a finished job is left alone)."""
        job.cancelled = True
        with self.lock:
            out = self.jobs.pop(job.id, None) is not None
        if out:
            self.send(("cancel", job.id))

    def send(self, command: tuple) -> None:
        """A command to the model process. Never under self.lock: while a long one waits for the model process to
        read it, the reader thread must go on taking the model process's replies."""
        with self.sending:
            try:
                self.commands.send(command)
            except OSError:  # the model process is gone: the reader thread fails the jobs
                pass

    def n_waiting(self) -> int:
        return sum(not job.admitted for job in self.jobs.values())

    def stop(self) -> None:
        """Let the model process finish the jobs it has, then end it (once; later calls return)."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
        self.send(("stop",))
        self.reader.join(STOP_SECONDS)
        self.end_process()

    def end_process(self) -> None:
        with self.sending:
            self.commands.close()
        self.process.join(STOP_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def read(self) -> None:
        """The reader thread: each step's updates to their jobs, until the model process stops or dies."""
        while True:
            try:
                message = self.replies.recv()
            except (EOFError, OSError):
                return self.fail_all(RuntimeError("the model process exited"))
            if message[0] == "stopped":
                return
            self.deliver(*message[1:])

    def deliver(self, admitted: list, updates: list, step_seconds: float, batch_size: int) -> None:
        now = time.monotonic()
        sends = collections.defaultdict(list)  # event loop -> [(job, update)]: one wake-up per loop and step
        with self.lock:
            for job_id, when in admitted:
                if (job := self.jobs.get(job_id)) is not None:
                    job.admitted = True
                    self.metrics.queue_wait.observe(when - job.submitted)
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
                sends[job.loop].append((job, RowUpdate(job_id, new, done, error=error)))
            self.metrics.queue_depth.set(self.n_waiting())
        if step_seconds:
            self.metrics.step_time.observe(step_seconds)
        self.metrics.running_batch_size.set(batch_size)
        for loop, pairs in sends.items():
            loop.call_soon_threadsafe(put_all, pairs)

    def fail_all(self, error: Exception) -> None:
        """The model process is gone: every job still out gets the error."""
        with self.lock:
            self.alive = False
            jobs, self.jobs = list(self.jobs.values()), {}
        for job in jobs:
            job.loop.call_soon_threadsafe(put_all, [(job, RowUpdate(job.id, done=True, error=error))])


def put_all(pairs: list[tuple[Job, RowUpdate]]) -> None:
    """On the event loop: each update into its job's queue."""
    for job, update in pairs:
        job.updates.put_nowait(update)


# ------------------------------------------------------------------------------------------------- model process


def run_model(spec: ModelSpec, max_batch: int, commands, replies) -> None:
    """The model process: open the model, send its card, then run its batch until told to stop."""
    # Ctrl-C and SIGTERM are for the server's process: it lets the requests in flight finish, then stops this one
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        session, card = open_session(spec, max_batch)
        replies.send(("ready", card))
        ModelLoop(session, max_batch, replies).run(commands)
    except UserError as e:
        replies.send(("failed", str(e)))
    except BrokenPipeError:  # the server's process is gone
        pass


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


class ModelLoop:
    """The model process's loop: commands in between steps, each step's updates out."""

    def __init__(self, session, max_batch: int, replies):
        self.session, self.max_batch, self.replies = session, max_batch, replies
        self.waiting: dict[int, GenerateRequest] = {}  # job id -> request, in order of arrival
        self.running: dict[int, int] = {}  # session row -> job id
        self.stopping = False

    def run(self, commands) -> None:
        reported_size = 0  # the batch size the server's process last heard of
        while True:
            idle = not self.waiting and not len(self.session)
            if idle and self.stopping:
                return self.replies.send(("stopped",))
            try:  # commands that came during the step; with nothing to do or report, wait for one
                while commands.poll(None if idle and not self.stopping and not reported_size else 0):
                    self.obey(commands.recv())
                    idle = not self.waiting and not len(self.session)
            except EOFError:  # the server's process is gone
                return
            admitted, updates = self.admit()
            seconds = 0.0
            if len(self.session):
                start = time.perf_counter()
                updates += self.step()
                seconds = time.perf_counter() - start
            if admitted or updates or len(self.session) != reported_size:  # a cancelled row's leaving too
                reported_size = len(self.session)
                self.replies.send(("step", admitted, updates, seconds, reported_size))

    def obey(self, command: tuple) -> None:
        if command[0] == "add":
            self.waiting.update(command[1])
        elif command[0] == "cancel":
            job_id = command[1]
            if self.waiting.pop(job_id, None) is None:
                row = next((row for row, job in self.running.items() if job == job_id), None)
                if row is not None:  # else it is done already
                    self.session.cancel(row)
                    del self.running[row]
        elif command[0] == "stop":
            self.stopping = True

    def admit(self) -> tuple[list, list]:
        """Waiting jobs join while there is room -> [(job id, when)], [failure updates of jobs refused]."""
        admitted, refused = [], []
        while self.waiting and len(self.session) < self.max_batch:
            job_id = next(iter(self.waiting))
            request = self.waiting.pop(job_id)
            try:
                self.running[self.session.add(request)] = job_id
            except Exception as e:  # noqa: BLE001 - a request the session refuses fails alone
                refused.append((job_id, b"", True, portable(e)))
                continue
            admitted.append((job_id, time.monotonic()))
        return admitted, refused

    def step(self) -> list[tuple]:
        """One step of every row -> [(job id, new bytes, done, error)]."""
        try:
            updates = self.session.step()
        except Exception as e:  # noqa: BLE001 - the step failed for every row: each gets the error, none stays
            updates = [RowUpdate(row, done=True, error=e) for row in self.running]
            for row in self.running:
                self.session.cancel(row)
        out = []
        for update in updates:
            job_id = self.running.pop(update.row, None) if update.done else self.running.get(update.row)
            if job_id is not None:
                out.append((job_id, update.new, update.done, portable(update.error)))
        return out


def portable(error: Exception | None) -> Exception | None:
    """An error as it crosses to the server's process: a UserError (the request's fault, a 400) keeps its message;
    any other is logged here and becomes a RuntimeError naming its type (a 500)."""
    if error is None or type(error) is UserError:
        return error
    if isinstance(error, UserError):
        return UserError(str(error))
    traceback.print_exception(error)
    return RuntimeError(f"{type(error).__name__}: {error}")
