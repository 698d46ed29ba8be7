"""The server's Prometheus metrics (GET /metrics). `bytedeploy serve` runs them in prometheus_client's multiprocess
mode: each process (HTTP workers, model process) records its own, /metrics adds them up. The model process records
the steps, the batch size and the queue wait, a worker its requests, tokens, queue depth and latencies."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The server's metrics, in a registry of their own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bytedeploy_requests", "HTTP requests to /v1, by status code", ["status"], registry=r)
        self.tokens = Counter("bytedeploy_generated_tokens", "Tokens generated (the model's unit)", registry=r)
        self.queue_depth = Gauge("bytedeploy_queue_depth", "Requests waiting to join the batch", registry=r,
                                 multiprocess_mode="livesum")
        self.running_batch_size = Gauge("bytedeploy_running_batch_size", "Rows in the running batch", registry=r,
                                        multiprocess_mode="mostrecent")
        self.time_to_first_token = Histogram("bytedeploy_time_to_first_token_seconds",
                                             "From arrival to the first output", buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("bytedeploy_time_per_output_token_seconds",
                                               "Between outputs of a request, per token", buckets=LATENCY_BUCKETS,
                                               registry=r)
        # where a request's time to first token goes: waiting to join, then the batch's steps
        self.queue_wait = Histogram("bytedeploy_queue_wait_seconds", "From arrival to joining the running batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram("bytedeploy_step_seconds", "One step of the running batch (bGPT: a patch)",
                                   buckets=LATENCY_BUCKETS, registry=r)
