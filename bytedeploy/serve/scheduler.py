"""One scheduler per model: continuous batching over the model's batch session (bytedeploy.runner).

A worker thread owns the session and runs the model off the event loop. Between two steps it takes waiting jobs
into the batch while it has room (a job joins at the next step: bGPT's next patch) and drops the rows of cancelled
jobs; each step's RowUpdates go to their jobs' asyncio queues on the event loop. A job leaves the batch when its
row is done. The queue of waiting jobs is bounded: submit raises QueueFull, which the server answers with 429.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from bytedeploy.generation import GenerateRequest, RowUpdate


class QueueFull(Exception):
    """No room in the queue of waiting jobs."""


@dataclass
class Job:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # RowUpdates, read on the event loop
    submitted: float = field(default_factory=time.perf_counter)
    row: int | None = None  # its row in the session, once admitted
    cancelled: bool = False
    last_update: float | None = None  # when it last received output (per-token latency)


class Scheduler:
    def __init__(self, model, max_batch: int, max_queue: int, metrics):
        self.model, self.max_batch, self.max_queue, self.metrics = model, max_batch, max_queue, metrics
        self.session = model.session(max_batch)
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.work, name="bytedeploy-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Let the worker finish the rows it runs, then end it."""
        with self.changed:
            self.stopping = True
            self.changed.notify()
        self.thread.join()

    def submit(self, requests: list[GenerateRequest]) -> list[Job]:
        """Queue the requests as jobs, all or none (QueueFull)."""
        loop = asyncio.get_running_loop()
        with self.changed:
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            jobs = [Job(request, loop) for request in requests]
            self.waiting.extend(jobs)
            self.metrics.queue_depth.set(len(self.waiting))
            self.changed.notify()
        return jobs

    def cancel(self, job: Job) -> None:
        """The job leaves the queue or the batch before its next step (a finished job is left alone)."""
        with self.changed:
            job.cancelled = True
            self.changed.notify()

    def work(self) -> None:
        while True:
            with self.changed:
                self.admit_and_drop()
                if not len(self.session):
                    if self.stopping and not self.waiting:
                        return
                    self.changed.wait()
                    continue
            start = time.perf_counter()
            try:
                updates = self.session.step()
            except Exception as e:  # noqa: BLE001 - the step failed for every row: each gets the error, none stays
                updates = [RowUpdate(row, done=True, error=e) for row in self.running]
                for row in self.running:
                    self.session.cancel(row)
            self.metrics.step_time.observe(time.perf_counter() - start)
            self.deliver(updates)
            self.metrics.running_batch_size.set(len(self.session))

    def admit_and_drop(self) -> None:
        """Under the lock: rows of cancelled jobs leave the session, waiting jobs join while there is room."""
        for row, job in list(self.running.items()):
            if job.cancelled:
                self.session.cancel(row)
                del self.running[row]
        while self.waiting and len(self.session) < self.max_batch:
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            try:
                job.row = self.session.add(job.request)
            except Exception as e:  # noqa: BLE001 - a request the session refuses fails alone
                self.send(job, RowUpdate(-1, done=True, error=e))
                continue
            self.running[job.row] = job
            self.metrics.queue_wait.observe(time.perf_counter() - job.submitted)
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running_batch_size.set(len(self.session))

    def deliver(self, updates: list[RowUpdate]) -> None:
        now = time.perf_counter()
        sends = collections.defaultdict(list)  # event loop -> [(job, update)]: one wake-up per loop and step
        with self.changed:
            for update in updates:
                job = self.running.pop(update.row) if update.done else self.running.get(update.row)
                if job is None:
                    continue
                if update.new or update.done:
                    if job.last_update is None:
                        self.metrics.time_to_first_token.observe(now - job.submitted)
                    elif update.new:
                        tokens = max(self.model.count_tokens(update.new), 1)
                        self.metrics.time_per_output_token.observe((now - job.last_update) / tokens)
                    job.last_update = now
                sends[job.loop].append((job, update))
        for loop, pairs in sends.items():
            loop.call_soon_threadsafe(put_all, pairs)

    @staticmethod
    def send(job: Job, update: RowUpdate) -> None:
        job.loop.call_soon_threadsafe(job.updates.put_nowait, update)


def put_all(pairs: list[tuple[Job, RowUpdate]]) -> None:
    """On the event loop: each update into its job's queue."""
    for job, update in pairs:
        job.updates.put_nowait(update)
