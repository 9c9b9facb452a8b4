"""The decode loop of one loaded model inside a replica: gptcore's BatchEngine on its own thread.

Request handlers (asyncio, the replica's event loop) submit sequences and read what each step
released for them from an asyncio queue; the thread steps the engine while it has work and sleeps
otherwise. A handler that goes away (client disconnect, timeout, cancelled task) cancels its
sequences, which leave the batch at the next step. Bounded: past `max_queue` waiting sequences a
new request is refused with 429 rather than queued without end. Counts what the metrics need.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from flows.serve.protocol import APIError
from gptcore.batching import BatchEngine, SequenceOutput, SequenceRequest

log = logging.getLogger(__name__)


LATENCY_WINDOW = (
    2048  # latest requests kept for percentiles: a replica's lists must not grow forever
)


def _window() -> collections.deque:
    return collections.deque(maxlen=LATENCY_WINDOW)


@dataclass
class RunnerStats:
    """Totals since the runner started (the server turns them into rates and percentiles); latency
    and time to first token over the latest LATENCY_WINDOW requests."""

    requests: int = 0
    rejected: int = 0
    cancelled: int = 0  # sequences whose client went away (or timed out) before they finished
    completion_tokens: int = 0
    steps: int = 0
    occupied_rows: int = 0  # summed over steps: mean batch occupancy = occupied_rows / steps
    busy_s: float = 0.0
    ttft_s: collections.deque = field(default_factory=_window)
    latency_s: collections.deque = field(default_factory=_window)


class EngineRunner:
    """Drives one BatchEngine from a daemon thread for the coroutines of one event loop."""

    def __init__(self, engine: BatchEngine, max_queue: int, stats: RunnerStats | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.stats = stats or RunnerStats()  # shared by the models a replica serves in turn
        self._ids = itertools.count()
        self._subscribers: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending: dict[
            int, SequenceOutput
        ] = {}  # non-streaming sequences: tokens so far, sent at the end
        self._wake = threading.Event()
        self._stopped = False
        self.last_step = (
            time.time()
        )  # when the loop last finished a step (or went idle): /healthz reads it
        self._thread = threading.Thread(target=self._loop, name="gptflow-decode", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled_s(self) -> float:
        """Seconds the loop has had work without finishing a step (0 when idle or keeping up)."""
        if not self.engine.has_work():
            return 0.0
        return max(0.0, time.time() - self.last_step)

    @property
    def active(self) -> int:
        """Sequences submitted and not yet finished."""
        return len(self._subscribers)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def check_capacity(self, sequences: int) -> None:
        """429 when `sequences` more would overflow the free batch rows plus the bounded queue."""
        engine = self.engine
        if engine.waiting + sequences > self.max_queue + max(
            0, engine.max_batch_size - engine.running
        ):
            self.stats.rejected += 1
            raise APIError(
                429,
                f"the server is busy: {engine.waiting} sequences wait for a batch slot "
                f"(limit {self.max_queue}); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    async def generate(
        self, requests: list[dict], stream: bool = True
    ) -> AsyncIterator[tuple[int, SequenceOutput]]:
        """Run sequences (SequenceRequest fields without `id`); yield (index, output) as steps
        release them, until every one finished (with stream=False, one output per sequence when it
        finishes: the event loop is not woken per token). Closing the iterator cancels what is
        left."""
        self.check_capacity(len(requests))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ids = [next(self._ids) for _ in requests]
        index = {sid: i for i, sid in enumerate(ids)}
        open_ids = set(ids)
        start = time.perf_counter()
        first = True
        try:
            for sid, fields in zip(ids, requests, strict=True):
                self._subscribers[sid] = (loop, queue)
                if not stream:
                    self._pending[sid] = SequenceOutput(
                        sid,
                        [],
                        [] if fields.get("logprobs") is not None else None,
                        None,
                        len(fields["prompt"]),
                        0,
                    )
                try:
                    self.engine.submit(SequenceRequest(id=sid, **fields))
                except ValueError as e:
                    raise APIError(
                        400,
                        str(e),
                        param="prompt" if "prompt" in str(e) else "max_tokens",
                        code="invalid_value",
                    ) from e
            self.stats.requests += 1
            self._wake.set()
            while open_ids:
                item = await queue.get()
                if isinstance(
                    item, BaseException
                ):  # the detail (device memory, paths) is in the log only
                    raise APIError(
                        500,
                        "generation failed: internal error (logged on the server)",
                        type="server_error",
                    ) from item
                if first and item.tokens and stream:  # (a non-streamed sequence arrives whole)
                    self.stats.ttft_s.append(time.perf_counter() - start)
                    first = False
                self.stats.completion_tokens += len(item.tokens)
                if item.finish_reason is not None:
                    open_ids.discard(item.id)
                yield index[item.id], item
            self.stats.latency_s.append(time.perf_counter() - start)
        finally:
            for sid in ids:
                self._subscribers.pop(sid, None)
                self._pending.pop(sid, None)
                if sid in open_ids:
                    self.engine.cancel(sid)
                    self.stats.cancelled += 1

    def _loop(self) -> None:
        while not self._stopped:
            if not self.engine.has_work():
                self.last_step = time.time()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                rows = self.engine.running
                outputs = self.engine.step()
            except (
                Exception
            ) as e:  # a bug, not bad input (submit checked that): fail what runs, keep serving
                log.exception(
                    "decode step failed; failing the %d running sequences", self.engine.running
                )
                self.engine.abort()
                for loop, queue in list(self._subscribers.values()):
                    loop.call_soon_threadsafe(queue.put_nowait, e)
                continue
            self.last_step = time.time()
            self.stats.steps += 1
            self.stats.occupied_rows += rows
            self.stats.busy_s += time.perf_counter() - t0
            for out in outputs:
                sub = self._subscribers.get(out.id)
                if sub is None:
                    continue
                pending = self._pending.get(out.id)
                if pending is not None:  # not streamed: gather, deliver once
                    pending.tokens += out.tokens
                    if out.logprobs:
                        pending.logprobs += out.logprobs
                    pending.completion_tokens = out.completion_tokens
                    if out.finish_reason is None:
                        continue
                    pending.finish_reason = out.finish_reason
                    out = pending
                loop, queue = sub
                loop.call_soon_threadsafe(queue.put_nowait, out)
