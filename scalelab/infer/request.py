"""What callers hand the engine and get back: generation parameters, a submitted request (its
cancellation, its wait, its event stream), finished completions and streamed token events, the
queue's refusals, and how much of a growing text is safe to stream. The scheduler and decode loop
that serve these live in scalelab/infer/engine.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from scalelab.errors import ScalelabError
from scalelab.infer.sample import SamplingParams

@dataclass
class GenerationParams(SamplingParams):
    """SamplingParams plus what serving needs. ``seed=None`` draws a fresh random seed."""

    n: int = 1  # samples per prompt, sharing one prefill
    logprobs: bool = False  # log-probability of each sampled token under the model (raw logits, no temperature)
    # RL wants the sampling distribution itself: logits / temperature, taken before top-k/top-p cut it
    # (with top_k=0, top_p=1, as GRPO samples, that is exactly the distribution drawn from).
    logprobs_at_temperature: bool = False
    truncate_prompt: bool = False  # opt in: keep the end of a prompt too long for the context
    top_logprobs: int = 0  # with logprobs: also the k most likely tokens at each step, with theirs


class QueueFull(ScalelabError):
    """The waiting queue is at its limit: try again later."""


class QueueTimeout(ScalelabError):
    """A request waited longer than its queue timeout without being admitted."""


@dataclass
class Completion:
    """One sample. ``tokens`` are all sampled tokens (a stop string's tokens included, stop token ids not);
    ``text`` is cut exactly before the earliest stop string."""

    prompt_index: int
    index: int
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    logprobs: list[float] | None = None
    stop_logprob: float | None = None  # with logprobs: that of the stop token id that ended it (not in tokens)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # with top_logprobs: (token, logprob), likeliest first


@dataclass
class TokenEvent:
    """A streamed step of one sample. ``text`` is the newly final text: it lags the tokens while a stop
    string might still be forming or a multi-byte character is incomplete, and catches up at the end."""

    index: int
    token: int | None
    text: str
    logprob: float | None = None
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Request:
    """A submitted prompt. ``on_event`` is called from the engine's thread with each TokenEvent, then once
    with None when the whole request is over (finished, cancelled or failed)."""

    def __init__(self, prompt: list[int], params: GenerationParams, on_event: Callable | None, prompt_index: int = 0):
        self.prompt, self.params, self.on_event, self.prompt_index = prompt, params, on_event, prompt_index
        self.results: list[Completion | None] = [None] * params.n
        self.error: BaseException | None = None
        self.cancelled = False
        self.deadline: float | None = None  # time.monotonic() past which it leaves the queue unadmitted
        self.owner: str | None = None  # who asked: a free slot goes to the owner with the fewest running
        self._done = threading.Event()
        self._open = params.n

    def cancel(self) -> None:
        """Stop generating; the slots free up at the next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> list[Completion]:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        return [r for r in self.results if r is not None]

    def _emit(self, event: TokenEvent | None) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _close(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._emit(None)


def safe_text_end(text: str, stop_strings) -> int:
    """How much of a growing text is final: hold back a tail that could still become a stop string,
    and a trailing replacement character (a multi-byte character split across tokens)."""
    end = len(text)
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                end = min(end, len(text) - k)
                break
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end
