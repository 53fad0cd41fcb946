"""The model worker and the service's counters.

One thread owns the pipeline and runs jobs in order. A request takes a queue slot (`Worker.admit`) before it decodes
anything and holds it until its job starts, so at most `max_queue` requests hold decoded inputs while one runs:
memory is bounded by admission, not by how many requests arrive. A job withdrawn before it starts (the client went
away) frees its slot and drops its inputs at once.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import queue
import threading

# glibc keeps freed heap memory for reuse (its mmap threshold grows after the first large frees), so a burst of big
# images would stay in RSS for good; malloc_trim hands it back. Absent outside glibc, where this is a no-op.
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_memory() -> None:
    """Return freed heap pages to the OS (after a job has dropped its images)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Slot:
    """A place in the queue, held from admission until the job starts running or the request gives up."""

    def __init__(self, worker: Worker):
        self._worker, self._held = worker, True

    def release(self) -> None:
        with self._worker._lock:
            if self._held:
                self._held = False
                self._worker.waiting -= 1


class Job:
    def __init__(self, fn, slot: Slot):
        self.fn, self.slot = fn, slot
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def cancel(self) -> bool:
        """Withdraw a job that has not started: its slot is free at once and its inputs are dropped."""
        if not self.future.cancel():
            return False
        self.fn = None
        self.slot.release()
        return True


class Worker:
    """`admit` raises queue.Full when `max_queue` requests already wait (decoding or queued); `submit` queues a job
    under an admitted slot (or admits one itself). `start`/`stop` follow the app's lifespan; the thread also starts at
    construction, for servers that skip it."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.waiting = 0  # admitted and not yet running
        self.busy = False
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.start()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            if not self._stop.is_set():
                return
            self._thread.join(timeout=60)  # a stopped thread finishes its current job, then exits
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="qwen-lora-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)  # wake the thread if it is idle

    def admit(self) -> Slot:
        with self._lock:
            if self.waiting >= self.max_queue:
                raise queue.Full
            self.waiting += 1
        return Slot(self)

    def submit(self, fn, slot: Slot | None = None) -> Job:
        job = Job(fn, slot or self.admit())
        self._jobs.put(job)
        if self._stop.is_set() or not self._thread.is_alive():  # an app served again after a shutdown
            self.start()
        return job

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            job = self._jobs.get()
            if job is None:
                continue
            job.slot.release()
            fn, job.fn = job.fn, None
            if fn is not None and job.future.set_running_or_notify_cancel():
                self.busy = True
                try:
                    job.future.set_result(fn())
                except BaseException as e:  # handed to the request that submitted it
                    job.future.set_exception(e)
                finally:
                    self.busy = False
            # Drop this job before waiting for the next: its inputs must not stay alive while the thread idles.
            job = fn = None
            release_memory()


class Metrics:
    """Hand-written Prometheus counters (text exposition format 0.0.4)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.responses: dict[tuple[str, int], int] = {}
        self.images = 0
        self.seconds_sum = 0.0
        self.rejected_queue_full = 0

    def count_response(self, path: str, status: int) -> None:
        with self._lock:
            self.responses[(path, status)] = self.responses.get((path, status), 0) + 1

    def count_image(self, seconds: float) -> None:
        with self._lock:
            self.images += 1
            self.seconds_sum += seconds

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected_queue_full += 1

    def render(self, worker: Worker, decoding: int) -> str:
        with self._lock:
            lines = ["# HELP qwen_lora_http_responses_total HTTP responses by path and status code.",
                     "# TYPE qwen_lora_http_responses_total counter"]  # fmt: skip
            for (path, status), n in sorted(self.responses.items()):
                lines.append(f'qwen_lora_http_responses_total{{path="{path}",code="{status}"}} {n}')
            lines += [
                "# HELP qwen_lora_images_total Images generated.",
                "# TYPE qwen_lora_images_total counter",
                f"qwen_lora_images_total {self.images}",
                "# HELP qwen_lora_generation_seconds Time in the pipeline per image.",
                "# TYPE qwen_lora_generation_seconds summary",
                f"qwen_lora_generation_seconds_sum {self.seconds_sum:.6f}",
                f"qwen_lora_generation_seconds_count {self.images}",
                "# HELP qwen_lora_rejected_total Requests refused because the queue was full.",
                "# TYPE qwen_lora_rejected_total counter",
                f'qwen_lora_rejected_total{{reason="queue_full"}} {self.rejected_queue_full}',
                "# HELP qwen_lora_queue_depth Requests admitted and not yet running (decoding inputs or queued).",
                "# TYPE qwen_lora_queue_depth gauge",
                f"qwen_lora_queue_depth {worker.waiting}",
                "# HELP qwen_lora_decoding Input images being decoded now (at most serve's decode limit).",
                "# TYPE qwen_lora_decoding gauge",
                f"qwen_lora_decoding {decoding}",
                "# HELP qwen_lora_worker_busy 1 while the model worker is generating.",
                "# TYPE qwen_lora_worker_busy gauge",
                f"qwen_lora_worker_busy {int(worker.busy)}",
            ]
        return "\n".join(lines) + "\n"
