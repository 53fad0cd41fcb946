"""The service's Prometheus metrics, through prometheus_client, in a registry of the app's own (two apps in one
process, as in tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    """Counters the request path updates; gauges read the worker and the decode gate when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, worker, gate):
        self.registry = registry = CollectorRegistry()
        self._responses = Counter(
            "qwen_lora_http_responses", "HTTP responses by path and status code.", ["path", "code"], registry=registry
        )
        self._images = Counter("qwen_lora_images", "Images generated.", registry=registry)
        self._seconds = Summary("qwen_lora_generation_seconds", "Time in the pipeline per image.", registry=registry)
        # A layers job renders a background and each element: the longest jobs the worker runs, counted apart
        self._layers = Summary("qwen_lora_layers_seconds", "Time per layers job (all its renders).", registry=registry)
        self._rejected = Counter(
            "qwen_lora_rejected", "Requests refused because the queue was full.", ["reason"], registry=registry
        )
        Gauge(
            "qwen_lora_queue_depth",
            "Requests admitted and not yet running (decoding inputs or queued).",
            registry=registry,
        ).set_function(lambda: worker.waiting)
        Gauge(
            "qwen_lora_decoding", "Input images being decoded now (at most serve's decode limit).", registry=registry
        ).set_function(lambda: gate.active)
        Gauge("qwen_lora_worker_busy", "1 while the model worker is generating.", registry=registry).set_function(
            lambda: int(worker.busy)
        )

    def count_response(self, path: str, status: int) -> None:
        self._responses.labels(path=path, code=str(status)).inc()

    def count_image(self, seconds: float) -> None:
        self._images.inc()
        self._seconds.observe(seconds)

    def count_layers(self, seconds: float) -> None:
        self._layers.observe(seconds)

    def count_rejected(self) -> None:
        self._rejected.labels(reason="queue_full").inc()

    @property
    def images(self) -> int:
        return int(self.registry.get_sample_value("qwen_lora_images_total") or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
