"""Batching concurrent requests: a scheduler thread collects the jobs that arrive within `wait_ms`
of the first (up to `max_batch`) and decodes them together with the KV-cached generator
(generation.decode_steps, each row with its own settings and seed). Every job streams its text as
its row produces it and finishes as soon as its row stops, without waiting for the others; a job
whose client went away is cancelled and its row leaves the batch. A job's answer does not depend on
its neighbours: greedy rows take the argmax of their own logits, sampled rows draw from their own
seeded generator.

Stop strings (OpenAI's `stop`) are matched on the text: the answer ends before the first match,
and text that could be the start of a match is held back until it cannot.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from multimodal import generation
from multimodal.layouts.inputs import ImageInputs

FINISH = {"stop": "stop", "length": "length", "context": "length"}  # ours -> OpenAI's finish_reason


@dataclass
class Job:
    """One request's work: prompt ids (images expanded), its pixels, its settings; `events` receives
    ("delta", text), then ("done", finish_reason, completion_tokens) or ("error", message)."""

    prompt: list[int]
    pixels: torch.Tensor | ImageInputs | None
    config: generation.GenerationConfig
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    stream: bool = False  # text as it comes; otherwise one delta at the end (no per-token wake-ups)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Row:
    """The text a row has produced, cut at the first stop string. A row whose text nobody reads
    before the end (not streamed, no stop strings) keeps only its ids and decodes them once."""

    def __init__(self, job: Job, tokenizer) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.decoder = generation.IncrementalDecoder(tokenizer) if job.stream or job.stop else None
        self.ids: list[int] = []
        self.pending, self.tokens, self.done = "", 0, False
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string ended the answer."""
        self.tokens += 1
        if self.decoder is None:
            self.ids.append(token)
            return False
        return self._add(self.decoder.push(token), final=False)

    def _add(self, text: str, final: bool) -> bool:
        self.pending += text
        hits = [self.pending.find(s) for s in self.job.stop if s in self.pending]
        if hits:
            if min(hits):
                self.job.send("delta", self.pending[:min(hits)])
            self.pending = ""
            return True
        keep = 0 if final else self.hold
        if len(self.pending) > keep:
            cut = len(self.pending) - keep
            self.job.send("delta", self.pending[:cut])
            self.pending = self.pending[cut:]
        return False

    def finish(self, reason: str) -> None:
        if not self.done:
            rest = self.decoder.finish() if self.decoder is not None else self.tokenizer.decode(self.ids)
            stopped = self._add(rest, final=True)
            self.done = True
            self.job.send("done", "stop" if stopped else FINISH.get(reason, "stop"), self.tokens)


class BatchScheduler:
    def __init__(self, model, max_batch: int = 8, wait_ms: float = 5.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.wait_s = model, max_batch, wait_ms / 1000
        self.queue: queue.Queue[Job] = queue.Queue()
        self.batches = 0  # decoded batches, for tests and logs
        self.thread = threading.Thread(target=self._loop, name="salamandra-vl-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _collect(self) -> list[Job]:
        jobs = [self.queue.get()]
        deadline = time.monotonic() + self.wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                jobs.append(self.queue.get(timeout=remaining))
            except queue.Empty:
                break
        return [job for job in jobs if not job.cancelled]

    def _loop(self) -> None:
        while True:
            jobs = self._collect()
            if not jobs:
                continue
            try:
                self._run(jobs)
            except Exception as error:  # noqa: BLE001 - every waiting client gets the error, the server lives on
                for job in jobs:
                    job.send("error", f"{type(error).__name__}: {error}")

    def _run(self, jobs: list[Job]) -> None:
        model = self.model
        self.batches += 1
        with_images = [job.pixels for job in jobs if job.pixels is not None]
        if not with_images:
            pixels = None
        elif isinstance(with_images[0], ImageInputs):
            pixels = ImageInputs.cat(with_images)
        else:
            pixels = torch.cat(with_images)
        rows = [_Row(job, model.tokenizer) for job in jobs]
        reasons: list[str | None] = [None] * len(jobs)
        steps = generation.decode_steps(model, [job.prompt for job in jobs], pixels, [job.config for job in jobs],
                                        reasons)
        for tokens in steps:
            for index, (row, token) in enumerate(zip(rows, tokens)):
                if row.done:
                    continue
                if row.job.cancelled:
                    reasons[index] = reasons[index] or "cancelled"
                    row.done = True
                    continue
                if token is not None and row.push(token):
                    reasons[index] = reasons[index] or "stop_string"
                    row.done = True
                    row.job.send("done", "stop", row.tokens)
                elif reasons[index] is not None:
                    row.finish(reasons[index])
        for row, reason in zip(rows, reasons):
            row.finish(reason or "stop")
