"""The model worker.

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
import time

from qwen_image_lora.errors import UserError

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


class Stopping(UserError):
    """The service is shutting down: no new job is taken (the request gets 503)."""


class Worker:
    """`admit` raises queue.Full when `max_queue` requests already wait (decoding or queued); `submit` queues a job
    under an admitted slot (or admits one itself). `start`/`stop` follow the app's lifespan; the thread also starts at
    construction, for servers that skip it. `drain` is the first Ctrl-C: the running job ends, the queued ones are
    withdrawn, and nothing new is admitted."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.waiting = 0  # admitted and not yet running
        self.busy = False
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.draining = False
        self._seconds, self._done = 0.0, 0  # time in jobs, jobs run: when a slot frees, on average
        self.start()

    def record(self, seconds: float) -> None:
        """One job's time (images and layers alike: a queue slot frees when the running job ends, whatever it is)."""
        self._seconds, self._done = self._seconds + seconds, self._done + 1

    @property
    def mean_job_seconds(self) -> float | None:
        return self._seconds / self._done if self._done else None

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

    def drain(self) -> int:
        """Withdraw every queued job (their requests are answered at once) and admit no more; the running job goes
        on. Returns how many admitted requests are answered 503: the queued ones, and those still decoding their
        inputs, which `submit` refuses (counting the queued ones alone said 1 where 2 got 503)."""
        with self._lock:
            self.draining, waiting = True, self.waiting
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        self._jobs.put(None)
        return waiting

    def admit(self) -> Slot:
        with self._lock:
            if self.draining:
                raise Stopping
            if self.waiting >= self.max_queue:
                raise queue.Full
            self.waiting += 1
        return Slot(self)

    def submit(self, fn, slot: Slot | None = None) -> Job:
        if self.draining:  # admitted before the drain, decoded after it
            raise Stopping
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
                self.busy, started, failed = True, time.perf_counter(), None
                try:
                    result = fn()
                except BaseException as e:  # handed to the request that submitted it
                    failed = e
                self.busy = False
                if failed is None:  # a request refused by the generator's checks took no time of a real job
                    self.record(time.perf_counter() - started)  # before the request hears back: its next 429 counts it
                if failed is None:
                    job.future.set_result(result)
                else:
                    job.future.set_exception(failed)
            # Drop this job before waiting for the next: its inputs and output must not stay alive while it idles.
            job = fn = result = failed = None
            release_memory()
