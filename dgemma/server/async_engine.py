"""The engine in its own thread, bridged to asyncio.

The `Engine` is not thread-safe, so exactly one thread touches it. That thread loops:
    drain the inbox (add / abort commands)  ->  engine.step()  ->  hand the outputs to the event loop
and waits on a condition when there is nothing to do. Commands are applied only between steps, so requests
join and leave at step boundaries without disturbing the others.

Outputs cross to asyncio once per step: one `loop.call_soon_threadsafe` carries every update of that step, and
each lands in the asyncio queue of the `RequestGroup` (one API call: its n choices / several prompts) it
belongs to. Updates are snapshots (copied lists, finished statistics), never live engine objects.

If the engine thread dies, every pending group gets an `EngineDeadError` (nothing hangs), new submissions are
refused, and `alive` turns False (the server's /health answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from dgemma.engine.engine import Engine
from dgemma.engine.request import Request, RequestOutput
from dgemma.errors import DgemmaError
from dgemma.llm import GenerationStats, stats_of
from dgemma.server.metrics import ServerMetrics

log = logging.getLogger("dgemma.server")


class EngineDeadError(DgemmaError):
    """The engine thread stopped (crashed or shut down): the request cannot be served."""


@dataclass(frozen=True)
class Update:
    """What happened to one request of a group during one engine step."""

    index: int  # the request's position in its group
    new_token_ids: list[int]  # tokens committed this step (empty for a draft-only update)
    committed: bool  # a canvas was committed this step
    draft_ids: list[int] | None  # argmax of the canvas being denoised (if drafts were asked for)
    canvas: int  # canvases committed so far
    step: int  # denoising forwards of the current canvas so far
    finished: bool
    finish_reason: str | None
    stats: GenerationStats | None  # set when finished


class RequestGroup:
    """The engine requests of one API call; iterate it for their updates, in engine order."""

    def __init__(self, engine: "AsyncEngine", requests: list[Request]):
        self._engine = engine
        self.requests = requests
        self._queue: asyncio.Queue[Update | BaseException] = asyncio.Queue()
        self._unfinished = set(range(len(requests)))
        # Engine-thread bookkeeping: canvases already reported per request.
        self._canvases_seen = [0] * len(requests)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    async def __aiter__(self) -> AsyncIterator[Update]:
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._unfinished.clear()
                raise item
            if item.finished:
                self._unfinished.discard(item.index)
            yield item

    def abort(self) -> None:
        """Cancel every request of the group that has not finished (idempotent; safe after the end)."""
        for index in sorted(self._unfinished):
            self._engine.abort(self.requests[index].request_id)

    # Called on the event loop (via call_soon_threadsafe).
    def _put(self, item: Update | BaseException) -> None:
        self._queue.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None, num_threads: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.num_threads = num_threads  # torch intra-op threads of the engine thread (None: torch's default)
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []
        self._stopping = False
        self._closed = False  # the engine thread has ended: no command will be read again
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups: dict[str, tuple[RequestGroup, int]] = {}  # engine thread only: request id -> (group, index)
        self.error: BaseException | None = None
        self._dead_message: str | None = None

    # ---------------------------------------------------------------------------------- event-loop side
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="dgemma-engine", daemon=True)
        self._thread.start()
        if self.metrics:
            self.metrics.engine_alive.set(1)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None and not self._stopping

    @property
    def dead_message(self) -> str:
        return self._dead_message or "the engine is not running"

    async def submit(self, requests: list[Request]) -> RequestGroup:
        """Queue all of `requests` or none: raises QueueFull / RequestError / EngineDeadError from the engine."""
        if not self.alive:
            raise EngineDeadError(self.dead_message)
        group = RequestGroup(self, requests)
        future = self._loop.create_future()
        if not self._send(("add", group, future)):
            raise EngineDeadError(self.dead_message)
        try:
            await future
        except asyncio.CancelledError:
            group.abort()  # the client left while we waited: drop whatever the engine accepted
            raise
        return group

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Abort what is left, end the thread and wait for it (without blocking the event loop)."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.metrics:
            self.metrics.engine_alive.set(0)

    def _send(self, command: tuple) -> bool:
        """Queue a command for the engine thread; False once the thread is gone (the command is dropped)."""
        with self._cond:
            if self._closed:
                return False
            self._inbox.append(command)
            self._cond.notify()
            return True

    # ---------------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            if self.num_threads:
                # Set from this thread: OpenMP keeps the thread count per calling thread.
                torch.set_num_threads(self.num_threads)
            while True:
                with self._cond:
                    while not self._inbox and not self.engine.has_work and not self._stopping:
                        self._cond.wait()
                    commands, self._inbox = self._inbox, []
                    stopping = self._stopping
                deliveries: list[tuple[RequestGroup, Update | BaseException]] = []
                for command in commands:
                    self._apply(command, stopping, deliveries)
                if stopping:
                    self._abort_all(deliveries)
                    self._deliver(deliveries)
                    self._close(EngineDeadError("the server is shutting down"))
                    return
                if self.engine.has_work:
                    outputs = self.engine.step()
                    for out in outputs:
                        self._collect(out, deliveries)
                    if self.metrics:
                        s = self.engine.scheduler
                        self.metrics.on_step(self.engine.last_step.decode_batch, len(s.running), len(s.waiting))
                elif self.metrics:
                    self.metrics.on_queue(0, 0)
                self._deliver(deliveries)
        except BaseException as exc:  # noqa: BLE001 - anything that kills the thread must reach every waiter
            self._die(exc)

    def _apply(self, command: tuple, stopping: bool, deliveries: list) -> None:
        if command[0] == "abort":
            out = self.engine.abort(command[1])
            if out is not None:
                self._collect(out, deliveries)
            return
        _, group, future = command
        added: list[Request] = []
        try:
            if stopping:
                raise EngineDeadError("the server is shutting down")
            for request in group.requests:
                self.engine.add_request(request)
                added.append(request)
        except DgemmaError as exc:
            for request in added:
                self.engine.abort(request.request_id)
            self._resolve(future, exc)
            return
        for index, request in enumerate(group.requests):
            self._groups[request.request_id] = (group, index)
        if self.metrics:
            s = self.engine.scheduler
            self.metrics.on_queue(len(s.running), len(s.waiting))
        self._resolve(future, None)

    def _collect(self, out: RequestOutput, deliveries: list) -> None:
        entry = self._groups.get(out.request_id)
        if entry is None:
            return
        group, index = entry
        request = out.request
        canvases = len(request.stats.forwards_per_canvas)
        committed = canvases > group._canvases_seen[index]
        if not (committed or out.finished or out.draft_ids is not None):
            return
        group._canvases_seen[index] = canvases
        stats = None
        if committed and self.metrics:
            self.metrics.on_canvas(request.stats.forwards_per_canvas[-1])
        if out.finished:
            del self._groups[out.request_id]
            stats = stats_of(request)
            if self.metrics:
                end = request.stats.finish_s or time.perf_counter()
                first = request.stats.first_canvas_s
                self.metrics.on_finish(
                    out.finish_reason or "abort", stats.prompt_tokens, stats.completion_tokens,
                    stats.tokens_per_forward, None if first is None else first - request.stats.arrival_s,
                    end - request.stats.arrival_s,
                )
        deliveries.append((group, Update(
            index=index, new_token_ids=list(out.new_token_ids), committed=committed,
            draft_ids=None if committed or out.draft_ids is None else list(out.draft_ids),
            canvas=canvases, step=request.canvas_forwards, finished=out.finished,
            finish_reason=out.finish_reason, stats=stats,
        )))

    def _abort_all(self, deliveries: list) -> None:
        for request_id in list(self._groups):
            out = self.engine.abort(request_id)
            if out is not None:
                self._collect(out, deliveries)

    def _deliver(self, deliveries: list) -> None:
        if not deliveries:
            return

        def dispatch() -> None:
            for group, item in deliveries:
                group._put(item)

        self._call_soon(dispatch)

    def _resolve(self, future: asyncio.Future, exc: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)

        self._call_soon(settle)

    def _call_soon(self, callback) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    def _die(self, exc: BaseException) -> None:
        self.error = exc
        self._dead_message = f"the engine stopped after an internal error ({type(exc).__name__}: {exc})"
        sizes = ""
        try:
            s = self.engine.scheduler
            sizes = f" with {len(s.running)} running and {len(s.waiting)} waiting requests " \
                    f"(ids {[r.request_id for r in s.running][:8]})"
        except Exception:  # noqa: BLE001 - best effort context for the log line
            pass
        log.error("engine thread died%s", sizes, exc_info=exc)
        if self.metrics:
            self.metrics.engine_alive.set(0)
        dead = EngineDeadError(self._dead_message)
        deliveries: list = [(group, dead) for group in {g for g, _ in self._groups.values()}]
        self._groups.clear()
        self._deliver(deliveries)
        self._close(dead)

    def _close(self, exc: BaseException) -> None:
        """Refuse every later command and fail the submissions still in the inbox."""
        with self._cond:
            self._closed = True
            commands, self._inbox = self._inbox, []
        for command in commands:
            if command[0] == "add":
                self._resolve(command[2], exc)
