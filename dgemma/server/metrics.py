"""Prometheus metrics of one server: its own CollectorRegistry (no global state), so apps built in one process
(tests) never share or clash.

Engine-side metrics are observed from the engine thread (prometheus-client is thread-safe); HTTP-side ones from
the ASGI middleware.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_STEP_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
_TPF_BUCKETS = (0.5, 1, 2, 4, 8, 12, 16, 20, 24, 32, 64, 128, 256)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, {"model_name": model_name}

        def counter(name, doc, extra=()):
            return Counter(name, doc, ["model_name", *extra], registry=r)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=r).labels(**labels)

        def gauge(name, doc):
            return Gauge(name, doc, ["model_name"], registry=r).labels(**labels)

        self._labels = labels
        self.http_requests = counter("dgemma_http_requests", "HTTP requests answered, by route and status code",
                                     ("method", "route", "status"))
        self.requests_finished = counter("dgemma_requests_finished",
                                         "Engine requests (one per choice) that ended, by finish reason",
                                         ("finish_reason",))
        self.prompt_tokens = counter("dgemma_prompt_tokens", "Prompt tokens of finished engine requests").labels(**labels)
        self.generation_tokens = counter("dgemma_generation_tokens",
                                         "Tokens generated (committed, after EOS/length cuts)").labels(**labels)
        self.engine_steps = counter("dgemma_engine_steps", "Engine steps run (one encoder + one decoder batch each)").labels(**labels)
        self.time_to_first_canvas = histogram(
            "dgemma_time_to_first_canvas_seconds", "Arrival to the first committed canvas", _LATENCY_BUCKETS_S)
        self.e2e_latency = histogram("dgemma_e2e_request_latency_seconds", "Arrival to finish", _LATENCY_BUCKETS_S)
        self.steps_per_canvas = histogram("dgemma_denoising_steps_per_canvas",
                                          "Decoder forwards a canvas took before it was committed", _STEP_BUCKETS)
        self.tokens_per_forward = histogram("dgemma_tokens_per_forward",
                                            "Per finished request: generated tokens / its decoder forwards", _TPF_BUCKETS)
        self.batch_size = histogram("dgemma_decode_batch_size",
                                    "Canvases denoised in one batched decoder forward (per engine step)", _BATCH_BUCKETS)
        self.running = gauge("dgemma_num_requests_running", "Engine requests holding a cache row")
        self.waiting = gauge("dgemma_num_requests_waiting", "Engine requests queued for a cache row")
        self.engine_alive = gauge("dgemma_engine_alive", "1 while the engine thread runs, 0 once it stopped or died")

    # ---------------------------------------------------------------------------------- engine thread side
    def on_step(self, decode_batch: int, running: int, waiting: int) -> None:
        self.engine_steps.inc()
        if decode_batch:
            self.batch_size.observe(decode_batch)
        self.running.set(running)
        self.waiting.set(waiting)

    def on_queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def on_canvas(self, steps: int) -> None:
        self.steps_per_canvas.observe(steps)

    def on_finish(self, reason: str, prompt_tokens: int, completion_tokens: int, tokens_per_forward: float,
                  ttfc_s: float | None, e2e_s: float) -> None:
        self.requests_finished.labels(finish_reason=reason, **self._labels).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if tokens_per_forward > 0:
            self.tokens_per_forward.observe(tokens_per_forward)
        if ttfc_s is not None:
            self.time_to_first_canvas.observe(ttfc_s)
        self.e2e_latency.observe(e2e_s)

    # ---------------------------------------------------------------------------------- HTTP side
    def on_http(self, method: str, route: str, status: int) -> None:
        self.http_requests.labels(method=method, route=route, status=str(status), **self._labels).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
