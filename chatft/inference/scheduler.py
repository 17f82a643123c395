"""The server's queue and its one generation thread: admission, batching, cancellation.

- One generation thread takes the oldest waiting request and, with it, the waiting requests that can share its
  generation (same model and sampling, no seed; up to max_batch) as one left-padded batch: on this 2-core CPU
  a batch of 8 answers generates about 3x the tokens per second of one at a time (bench/serve.py).
- At most max_queue requests are admitted (generating and waiting); one more is refused with Busy.
- A client that disconnects stops its generation at the next token; a waiting one leaves the queue at once.
- Each answer is split as it comes into reasoning and answer (reasoning.ReasoningStream); the answer alone goes
  through StreamText: stop strings end it, and tool calls are looked for in it (after a think block too).

The event loop (the web app) and the generation thread share the queue under `wake`; everything a job's
client reads (its pieces, the end of it) goes back to the event loop through call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatft.inference.common import to_stderr
from chatft.inference.generation import Follow, Generated, generate_rows
from chatft.inference.openai_schema import ChatRequest, Limits
from chatft.inference.reasoning import ANSWER, ReasoningStream
from chatft.inference.streaming import StreamText
from chatft.inference.toolcalls import held_for_calls, parse_tool_calls

GATHER_S = 0.05  # how long after its first request a batch waits for more, when several clients are asking
CONCURRENT_S = 5.0  # for how long after two requests were admitted at once batches keep gathering


@dataclass
class Job:
    """A request admitted: its pieces go to `pieces` as (field, text), the field "reasoning_content" or "content"
    (then None); `cancel` stops it. thinking: the whole text split as it comes; text: the answer part."""

    request: ChatRequest
    pieces: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrived: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    thinking: ReasoningStream | None = None
    text: StreamText | None = None
    result: Generated | None = None
    started: float = 0.0
    finished: float = 0.0

    def batch_key(self) -> tuple | None:
        """Jobs with the same key can be generated in one batch; None: alone (a seed is for one answer)."""
        r = self.request
        if r.seed is not None:
            return None
        return (
            id(r.session),
            r.options.do_sample,
            r.options.temperature,
            r.options.top_p,
            r.options.max_time,
            r.options.repetition_penalty,
        )

    def feed(self, piece: str, final: bool = False) -> None:
        """(generation thread) A piece of the answer: what of its reasoning and of its answer may go out now
        goes to the client (final: the answer is complete, nothing is held back for the split)."""
        for kind, part in self.thinking.feed(piece, final):
            field_name = "reasoning_content"
            if kind == ANSWER:
                part, field_name = self.text.feed(part), "content"
            if part:
                self.loop.call_soon_threadsafe(self.pieces.put_nowait, (field_name, part))

    def answer(self) -> tuple[str, list[dict], str, str]:
        """(content, tool_calls, finish_reason, reasoning) of a finished job."""
        text = self.text.text if self.text else ""
        reasoning = self.thinking.whole()[0] if self.thinking else ""
        if self.request.tools:
            content, calls = parse_tool_calls(text, self.request.template_name)
            if calls:
                return content, calls, "tool_calls", reasoning
        finished = self.result is not None and (self.result.stopped or self.text.stopped)
        return text.strip(), [], "stop" if finished else "length", reasoning

    def usage(self) -> dict:
        prompt, completion = len(self.request.prompt_ids), self.result.produced if self.result else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Busy(Exception):
    """A request refused because max_queue requests are admitted; retry_after: seconds, a guess from the mean
    time of an answer."""

    def __init__(self, admitted: int, max_queue: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy ({admitted} requests admitted, at most {max_queue}); retry in {retry_after} s"
        )
        self.retry_after = retry_after


class Scheduler:
    """The queue of admitted jobs, the generation thread that works through it, and the counts /health shows.
    `limits` is read at each use: changing it changes the running scheduler."""

    def __init__(self, limits: Limits, say: Callable[[str], Any] = to_stderr) -> None:
        self.limits, self.say = limits, say
        self.pending: deque[Job] = deque()
        self.wake = threading.Condition()
        self.closing = False
        self.admitted = 0  # changed in the event loop only
        self.generating = 0  # the size of the batch being generated
        self.served = self.cancelled = self.batches = self.largest_batch = 0
        self.seconds_per_answer = 1.0  # a running mean, for Retry-After
        self.concurrent_at = -1e9  # when two requests were last admitted at once
        self.worker = threading.Thread(target=self._work, name="chatft-generate", daemon=True)
        self.worker.start()

    def close(self) -> None:
        with self.wake:
            self.closing = True
            self.wake.notify()

    # --- in the event loop

    def admit(self, request: ChatRequest) -> Job:
        """The request queued as a job (Busy when max_queue are admitted)."""
        if self.admitted >= self.limits.max_queue:
            wait = max(1, round(self.seconds_per_answer * self.admitted / max(1, self.limits.max_batch)))
            raise Busy(self.admitted, self.limits.max_queue, wait)
        job = Job(request, asyncio.Queue(), asyncio.get_running_loop(), arrived=time.monotonic())
        self.admitted += 1
        if self.admitted > 1:
            self.concurrent_at = job.arrived  # several clients now: batches gather (see _next_batch)
        with self.wake:
            self.pending.append(job)
            self.wake.notify()
        return job

    def release(self, job: Job) -> None:
        """When a client has its answer or is gone: the job stops at its next token, and a job still waiting
        leaves the queue now."""
        job.cancel.set()
        with self.wake:
            waiting = job in self.pending
            if waiting:
                self.pending.remove(job)
        if waiting:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        """The job is over (answered, cancelled or failed): its place is free, its client is told (None)."""
        self.admitted -= 1
        if job.cancel.is_set() and (job.result is None or not job.result.stopped):
            self.cancelled += 1
        if job.result is not None:
            self.served += 1
            self.seconds_per_answer = 0.8 * self.seconds_per_answer + 0.2 * (job.finished - job.started)
        job.pieces.put_nowait(None)

    # --- in the generation thread

    def _work(self) -> None:
        """The generation thread: batch after batch until the server closes."""
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        """The next batch to generate (empty when every waiting job was cancelled); None once closing."""
        with self.wake:
            while not self.pending and not self.closing:
                self.wake.wait()
            if not self.closing and time.monotonic() - self.concurrent_at < CONCURRENT_S:
                self._gather()
            return None if self.closing else self._take()

    def _gather(self) -> None:
        """Clients that ask at once arrive a few milliseconds apart: wait for them a little (holding `wake`), or
        the batches of clients asking in a loop stay split (1 + 3 instead of 4). One client alone never waits
        (see admit)."""
        deadline = self.pending[0].arrived + GATHER_S
        while len(self.pending) < self.limits.max_batch and not self.closing:
            if (left := deadline - time.monotonic()) <= 0:
                break
            self.wake.wait(left)

    def _take(self) -> list[Job]:
        """The oldest waiting job and the waiting jobs that can share its generation, out of the queue."""
        gone = [job for job in self.pending if job.cancel.is_set()]  # their clients left while they waited
        for job in gone:
            self.pending.remove(job)
            job.loop.call_soon_threadsafe(self._finish, job)
        if not self.pending:
            return []
        first = self.pending.popleft()
        batch, key = [first], first.batch_key()
        if key is not None:
            for job in list(self.pending):
                if len(batch) >= self.limits.max_batch:
                    break
                if job.batch_key() == key:
                    self.pending.remove(job)
                    batch.append(job)
        return batch

    def _run(self, batch: list[Job]) -> None:
        """The batch generated and each of its jobs finished, whatever happens: a bug or a fault of the model
        gives its clients an error, and the server goes on."""
        try:
            self._generate(batch)
        except Exception as e:
            self.say(f"generation failed: {type(e).__name__}: {e}")
            for job in batch:
                job.result = None
        for job in batch:
            job.loop.call_soon_threadsafe(self._finish, job)

    def _generate(self, batch: list[Job]) -> None:
        """The batch's answers, each job's pieces handed to its event loop as they come."""
        first = batch[0].request
        if first.seed is not None:
            from transformers import set_seed

            set_seed(first.seed)
        follows = [self._follow(job) for job in batch]
        self.generating = len(batch)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        started = time.monotonic()
        try:
            prompts = [job.request.prompt_ids for job in batch]
            results = generate_rows(first.session, prompts, first.options, follows)
        finally:
            self.generating = 0
        for job, result in zip(batch, results, strict=True):
            job.feed("", final=True)  # what the split held back
            job.result, job.started, job.finished = result, started, time.monotonic()

    @staticmethod
    def _follow(job: Job) -> Follow:
        """How the generation follows the job: its own token cap, its text split into reasoning and answer and
        streamed (the answer through StreamText, which holds back stop strings and tool calls) to its event loop,
        its end when cancelled or stopped."""
        request = job.request
        hold, hold_all = held_for_calls(request.template_name) if request.tools else ([], False)
        job.thinking = ReasoningStream(request.opened)
        job.text = StreamText(request.stop, hold, hold_all)

        def stop_when() -> bool:
            return job.cancel.is_set() or job.text.stopped

        return Follow(request.options.max_new_tokens, job.feed, stop_when)
