"""The one owner of the model in a server: admission, a worker thread that runs jobs, and their progress.

HTTP handlers call :meth:`Engine.submit` (checks, then a durable row; no GPU work) and then wait, poll or
stream; a single worker thread takes queued jobs in order and is the only caller of the pipeline, so the
GPU runs one thing at a time and handlers never block on it. Queued jobs of equal settings (the same
:func:`~sd35.pipeline.batch_key`) are taken together and sampled as one batch.

Checks come in the order of :mod:`sd35.request`: the request checked itself when it was made; here the
loaded model's :meth:`~sd35.pipeline.SD3Pipeline.check` (sizes, SLG layers, LoRA names) and then the
deployment's :class:`~sd35.server.settings.Limits`, all before the job exists, so a bad request is a 4xx
and never a failed job.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sd35.errors import Cancelled, Conflict, InvalidRequest, SD35Error
from sd35.image_io import replace_png
from sd35.pipeline import SD3Pipeline, batch_key
from sd35.request import RANDOM_SEED, GenerateRequest
from sd35.result import GenerateResult, Progress
from sd35.server.catalog import ModelCatalog
from sd35.server.jobs import CANCELLED, Job, JobStore, error_record
from sd35.server.schemas.native import JobCreate, settings_view
from sd35.server.settings import Limits, ServerSettings
from sd35.server.workflow_jobs import (
    WORKFLOW_API,
    WORKFLOW_MODEL,
    WorkflowRunner,
    images_of,
    limit_error,
    stored_body,
)
from sd35.workflows.evaluate import samplings
from sd35.workflows.run import RunHooks

log = logging.getLogger("sd35.server")

Event = dict[str, Any]
Listener = Callable[[Event], None]
EVERY_JOB = "*"
"""Listen to this id to hear every job's events (each event carries its ``job_id``)."""
PURGE_EVERY_S = 600.0


def check_limits(request: GenerateRequest, limits: Limits) -> None:
    """A request against a deployment's limits; each failure names its field. Settings left unset (a
    request for a model that is not loaded yet) are checked when its job runs, by the model's own
    checks; its defaults are the model's, which a deployment trusts."""
    for name in ("prompt", "negative_prompt"):
        if len(getattr(request, name)) > limits.max_prompt_chars:
            raise InvalidRequest(
                f"{name} is {len(getattr(request, name))} characters long; this server takes at most "
                f"{limits.max_prompt_chars}.",
                param=name,
            )
    sizes = [("width", request.width), ("height", request.height)]
    if request.hires is not None and request.width is not None and request.height is not None:
        sizes += [("hires.scale", side) for side in request.hires.size(request.width, request.height)]
    for param, side in sizes:
        if side is not None and side > limits.max_size:
            raise InvalidRequest(
                f"{param}: {side} px is larger than this server allows (at most {limits.max_size} px a side).",
                param=param,
            )
    steps = [("steps", request.steps)] + ([("hires.steps", request.hires.steps)] if request.hires else [])
    for param, value in steps:
        if value is not None and value > limits.max_steps:
            raise InvalidRequest(
                f"{param}: {value} steps is more than this server allows (at most {limits.max_steps}).",
                param=param,
            )
    if request.num_images > limits.max_batch:
        raise InvalidRequest(
            f"{request.num_images} images in one request is more than this server allows (at most "
            f"{limits.max_batch}).",
            param="num_images",
        )


@dataclass
class LiveState:
    """A running job's progress, as the worker last reported it."""

    fraction: float = 0.0
    step: int = 0
    steps: int = 0
    stage: str = "base"
    image: int = 0
    images: int = 1
    started: float = 0.0
    progress: Progress | None = None

    @property
    def eta(self) -> float | None:
        """Seconds left, extrapolated from the time so far (None before the first step)."""
        if self.fraction <= 0:
            return None
        elapsed = time.time() - self.started
        return elapsed * (1 - self.fraction) / self.fraction


def _decode(job: Job) -> GenerateRequest:
    return JobCreate.model_validate(job.request).to_request()


class Engine:
    """Jobs in, images out: see the module docstring.

    ``load(name)`` loads the checkpoint the catalog knows as ``name`` (with the server's text encoders,
    device and memory mode); ``pipe`` is the model already loaded, known as ``model``.
    """

    def __init__(
        self,
        settings: ServerSettings,
        catalog: ModelCatalog,
        pipe: SD3Pipeline,
        model: str,
        load: Callable[[str], SD3Pipeline],
        store: JobStore | None = None,
        workflows: WorkflowRunner | None = None,
    ):
        self.settings = settings
        self.catalog = catalog
        self._loaded: tuple[str, SD3Pipeline | None] = (
            model,
            pipe,
        )  # one value: read together, swapped whole
        self.default_model = model  # what a request that names none gets
        self._load = load
        self.store = store or JobStore(settings.data_dir, settings.jobs_db)
        self.workflows = workflows  # None: this server runs no ComfyUI workflows
        # who runs a job, in the store; unique per engine, so a restarted server never adopts a dead one's
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._model_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cancel: set[str] = set()
        self._live: dict[str, LiveState] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        self._last_purge = 0.0
        self.jobs_run = 0

    # ------------------------------------------------------------------------------ life

    def start(self) -> None:
        """Requeue what a crash interrupted and start the worker (and, on a shared queue, the lease keeper).

        The only server on a queue requeues every running job (their server died); on a queue that other
        servers share, only jobs whose lease ran out are theirs to requeue, now and every third of a lease.
        """
        shared = self.settings.shared_queue
        recovered = self.store.reap(self.worker_id) if shared else self.store.recover()
        if recovered:
            log.info("requeued %d job(s) interrupted by a stop: %s", len(recovered), ", ".join(recovered))
        self._thread = threading.Thread(target=self._work, name="sd35-worker", daemon=True)
        self._thread.start()
        if shared:
            self._keeper = threading.Thread(target=self._keep_leases, name="sd35-leases", daemon=True)
            self._keeper.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; the running one stops at its next step and is requeued at the next start."""
        self._stopping.set()
        self._wake.set()
        for thread in (self._thread, self._keeper):
            if thread is not None:
                thread.join(timeout)
        self.store.close()

    def _keep_leases(self) -> None:
        """Renew this worker's leases, and requeue the jobs of workers that stopped renewing theirs."""
        while not self._stopping.wait(self.settings.lease_s / 3):
            try:
                self.store.renew(self.worker_id, self.settings.lease_s)
                reaped = self.store.reap()
            except Exception:  # a database hiccup: the next round tries again
                log.exception("renewing the job leases failed")
                continue
            if reaped:
                log.warning("requeued %d job(s) of a server that stopped: %s", len(reaped), ", ".join(reaped))
                self._wake.set()

    @property
    def model(self) -> str:
        """The name of the model loaded (or being loaded)."""
        return self._loaded[0]

    @property
    def pipe(self) -> SD3Pipeline:
        """The loaded pipeline (the worker's; None only while a model switch loads the next one)."""
        return self._loaded[1]  # type: ignore[return-value]

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------ admission

    def submit(
        self,
        request: GenerateRequest,
        api: str,
        model: str | None = None,
        idempotency_key: str | None = None,
        here: bool = False,
    ) -> Job:
        """Check ``request`` and store it as a queued job (or return the job of a repeated idempotency key).

        ``here`` reserves the job for this engine's worker on a shared queue: a synchronous request runs
        where its client waits (so a load balancer's count of requests per server is its count of work).
        Raises the request's :class:`~sd35.errors.SD35Error` (a 4xx), :class:`~sd35.errors.Busy` when the
        queue is full.
        """
        model = model or self.default_model
        self.catalog.checkpoint(model)  # NotFound for a name the server does not have
        loaded, pipe = self._loaded
        ready = pipe is not None and model == loaded
        check_limits(pipe.check(request).request if ready else request, self.settings.limits)
        seed_drawn = request.seed is None or request.seed == RANDOM_SEED
        if seed_drawn:
            request = replace(request, seed=random.randrange(2**32))  # drawn once: a rerun repeats it
        body = JobCreate.from_request(request).model_dump(exclude_none=True)
        worker = self.worker_id if here and self.settings.shared_queue else None
        job, created = self.store.enqueue(
            api, model, body, self.settings.queue_limit, idempotency_key, seed_drawn=seed_drawn, worker=worker
        )
        if created:
            self._wake.set()
        return job

    def submit_workflow(self, body: dict[str, Any], job_id: str | None = None, front: bool = False) -> Job:
        """Check a ComfyUI ``/prompt`` body's graph (and its samplers against the deployment's limits) and
        store it as a queued workflow job (``job_id``: the client's own id; ``front``: before every waiting job). Raises WorkflowError (naming
        the node), Conflict for a taken id, or Busy; nothing is stored for a bad graph."""
        if self.workflows is None:
            raise SD35Error("this server runs no ComfyUI workflows.", param="prompt")
        plan = self.workflows.check(body.get("prompt"))
        prompt = body["prompt"]
        for sampling in samplings([output.image for output in plan.outputs]):
            try:
                check_limits(sampling.request, self.settings.limits)
            except SD35Error as e:
                raise limit_error(sampling.node, prompt[sampling.node]["class_type"], e) from None
        job, created = self.store.enqueue(
            WORKFLOW_API,
            WORKFLOW_MODEL,
            stored_body(body),
            self.settings.queue_limit,
            job_id=job_id,
            front=front,
        )
        if created:
            self._wake.set()
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or a running one at its next step."""
        job = self.store.get(job_id)
        if job.is_final:
            raise Conflict(
                f"job {job_id} already ended ({job.status}); there is nothing to cancel.", param="id"
            )
        if self.store.cancel_queued(job_id):
            self._emit(job_id, {"event": "cancelled"})
        else:
            with self._lock:
                self._cancel.add(job_id)
        return self.store.get(job_id)

    def interrupt(self) -> list[str]:
        """Cancel every running job (A1111's interrupt); returns their ids."""
        with self._lock:
            running = list(self._live)
            self._cancel.update(running)
        return running

    def set_model(self, name: str) -> None:
        """Load ``name`` (if it is not loaded) and make it the default for new requests; blocks until loaded."""
        self.catalog.checkpoint(name)
        with self._model_lock:
            self._switch(name)
        self.default_model = name

    # ------------------------------------------------------------------------------ watching

    def live(self, job_id: str) -> LiveState | None:
        with self._lock:
            return self._live.get(job_id)

    def running(self) -> list[tuple[str, LiveState]]:
        with self._lock:
            return list(self._live.items())

    def listen(self, job_id: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` (from the worker thread) for each event of ``job_id``; returns the
        function that stops it. Events: ``running``, ``progress`` (step, steps, fraction, the
        :class:`Progress`), then one of ``done``, ``failed``, ``cancelled``."""
        with self._lock:
            self._listeners.setdefault(job_id, []).append(listener)

        def stop() -> None:
            with self._lock:
                listeners = self._listeners.get(job_id, [])
                if listener in listeners:
                    listeners.remove(listener)
                if not listeners:
                    self._listeners.pop(job_id, None)

        return stop

    def _emit(self, job_id: str, event: Event) -> None:
        event = {**event, "job_id": job_id}
        with self._lock:
            listeners = [*self._listeners.get(job_id, ()), *self._listeners.get(EVERY_JOB, ())]
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a listener's failure is its own; the job goes on
                log.exception("a progress listener failed")

    # ------------------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                ran = self._run_next()
            except Exception:  # the worker must survive anything one job does
                log.exception("the worker failed between jobs")
                ran = False
            if not ran:
                self._wake.wait(1.0)
                self._wake.clear()
                if time.time() - self._last_purge > PURGE_EVERY_S:
                    self._last_purge = time.time()
                    self.store.purge(time.time() - self.settings.keep_days * 86400)

    def _switch(self, name: str) -> None:
        """Make catalog model ``name`` the loaded model (the caller holds the model lock)."""
        self._use(name, lambda: self._load(name))

    def _use(self, name: str, load: Callable[[], SD3Pipeline]) -> SD3Pipeline:
        """The pipeline known as ``name``, loaded by ``load()`` in place of the one in memory unless it is
        that one (the caller holds the model lock). A failed load brings the server's default model back."""
        if name == self.model and self.pipe is not None:
            return self.pipe
        log.info("loading model %s", name)
        self._loaded = (name, None)  # free the old weights before loading the new ones
        gc.collect()
        try:
            self._loaded = (name, load())
        except BaseException:
            default = self.default_model  # a catalog name, so the server keeps serving
            self._loaded = (default, self._load(default))
            raise
        return self.pipe

    def _fail(self, job_id: str, e: BaseException) -> None:
        if isinstance(e, Cancelled) and self._stopping.is_set() and job_id not in self._cancel:
            self.store.requeue(job_id)  # stopped by a shutdown, not by its client: it runs after the restart
            return
        if isinstance(e, Cancelled) or job_id in self._cancel:
            self.store.fail(job_id, CANCELLED, "cancelled")
            self._emit(job_id, {"event": "cancelled"})
            return
        if not isinstance(e, SD35Error):
            log.error("job %s failed", job_id, exc_info=e)
        self.store.fail(job_id, error_record(e))
        self._emit(job_id, {"event": "failed"})

    def _batch(self, jobs: list[Job]) -> list[tuple[Job, GenerateRequest]]:
        """The first queued job and the waiting jobs that can share its sampling batch, checked."""
        first = jobs[0]
        try:
            self._switch(first.model)
            head = self.pipe.check(_decode(first)).request
        except Exception as e:
            if self.store.start([first.id], self.worker_id, self.settings.lease_s):  # not if another took it
                self._fail(first.id, e)
            return []
        batch = [(first, head)]
        key = batch_key(head) if self.settings.batching else None
        rows = head.num_images
        for job in jobs[1:] if key is not None else ():
            if job.api == WORKFLOW_API or job.model != first.model or job.id in self._cancel:
                continue
            try:
                req = self.pipe.check(_decode(job)).request
            except Exception:
                continue  # it fails on its own turn, with its own message
            if batch_key(req) == key and rows + req.num_images <= self.settings.max_batch_rows:
                batch.append((job, req))
                rows += req.num_images
        return batch

    def _run_next(self) -> bool:
        queued = self.store.queued(limit=4 * self.settings.max_batch_rows, worker=self.worker_id)
        if not queued:
            return False
        if queued[0].api == WORKFLOW_API:
            self._run_workflow(queued[0])
            return True
        with self._model_lock:
            batch = self._batch(queued)
            started = set(
                self.store.start([job.id for job, _ in batch], self.worker_id, self.settings.lease_s)
            )
            batch = [(job, req) for job, req in batch if job.id in started]
            if not batch:
                return True
            ids = [job.id for job, _ in batch]
            now = time.time()
            with self._lock:
                for job, req in batch:
                    self._live[job.id] = LiveState(images=req.num_images, started=now)
            for job_id in ids:
                self._emit(job_id, {"event": "running"})
            error: BaseException | None = None
            try:
                results = self._generate([req for _, req in batch], ids)
            except BaseException as e:
                results, error = [], e
            with self._lock:  # no longer running before anyone hears that it ended
                for job_id in ids:
                    self._live.pop(job_id, None)
            if error is not None:
                for job_id in ids:
                    self._fail(job_id, error)
            for job_id, result in zip(ids, results, strict=False):
                self._save(job_id, result)
            with self._lock:
                self._cancel.difference_update(ids)
            self.jobs_run += len(ids)
        return True

    def _run_workflow(self, job: Job) -> None:
        """Run one workflow job: its progress events name the sampler node (``node``), and it emits
        ``node`` (a sampler starts) and ``output`` (an output node's images, ComfyUI's shape)."""
        if self.workflows is None:  # a queue shared with a server that runs them
            if self.store.start([job.id], self.worker_id, self.settings.lease_s):
                self._fail(job.id, SD35Error("this server runs no ComfyUI workflows.", param="prompt"))
            return
        workflows = self.workflows
        folder = workflows.folder("output")

        def cancelled() -> bool:
            with self._lock:
                return self._stopping.is_set() or job.id in self._cancel

        hooks = RunHooks(
            on_node=lambda node: self._emit(job.id, {"event": "node", "node": node}),
            on_progress=lambda node, p: self._progress(job.id, p, node=node),
            cancel=cancelled,
            on_output=lambda node, files: self._emit(
                job.id, {"event": "output", "node": node, "images": images_of(files, folder)}
            ),
        )
        with self._model_lock:
            if not self.store.start([job.id], self.worker_id, self.settings.lease_s):
                return
            with self._lock:
                self._live[job.id] = LiveState(started=time.time())
            self._emit(job.id, {"event": "running"})
            result, error = None, None
            try:
                result = workflows.run(job.request, self._use, hooks)
            except BaseException as e:
                error = e
            with self._lock:
                self._live.pop(job.id, None)
            if error is not None:
                self._fail(job.id, error)
            elif self.store.finish(job.id, result or {}, self.worker_id):
                self._emit(job.id, {"event": "done"})
            with self._lock:
                self._cancel.discard(job.id)
            self.jobs_run += 1

    def _generate(self, requests: list[GenerateRequest], ids: list[str]) -> list[GenerateResult]:
        def cancelled() -> bool:
            with self._lock:
                return self._stopping.is_set() or all(job_id in self._cancel for job_id in ids)

        if len(requests) == 1:
            return [self.pipe.run(requests[0], lambda p: self._progress(ids[0], p), cancelled)]
        return self.pipe.run_batch(requests, lambda i, p: self._progress(ids[i], p), cancelled)

    def _progress(self, job_id: str, p: Progress, **more: Any) -> None:
        with self._lock:
            live = self._live.get(job_id)
            if live is None:
                return
            live.fraction, live.step, live.steps = p.fraction, p.step + 1, p.steps
            live.stage, live.image, live.images, live.progress = p.stage, p.image, p.images, p
        self._emit(job_id, {"event": "progress", "progress": p, **more})

    def _save(self, job_id: str, result: GenerateResult) -> None:
        """Write a job's images whole, then mark it done with their names (one transaction)."""
        if job_id in self._cancel:
            self._fail(job_id, Cancelled("the job was cancelled."))
            return
        try:
            names = []
            for i, (image, text) in enumerate(zip(result.images, result.infotexts, strict=True)):
                path = self.store.image_path(job_id, i)
                replace_png(image, path, text)  # a rerun after a crash rewrites the same name
                names.append(path.name)
            record = {
                "images": names,
                "seeds": result.seeds,
                "infotexts": result.infotexts,
                "warnings": result.warnings,
                "settings": settings_view(result.request),
                "timings": result.timings,
            }
        except Exception as e:
            self._fail(job_id, e)
            return
        if self.store.finish(job_id, record, self.worker_id):
            self._emit(job_id, {"event": "done"})
        else:  # its lease ran out and another worker took it: that one reports the end
            log.warning("job %s was taken over by another server; this run's result is dropped", job_id)
