"""Admission control and what ``/metrics`` shows.

A request is admitted when its caller (API key, or user id) has fewer than ``per_caller``
requests in flight and the engine's queue has room for its prompts; otherwise it gets a 429 with
``Retry-After``, at once, instead of a place in a queue that only grows. A request that waits in
the queue past ``queue_timeout`` gets a 503. The counters are exported in Prometheus' text format.
"""

from __future__ import annotations

import gc
from collections import Counter

from scalelab.serve.protocol import APIError

RETRY_AFTER_S = 1  # a full queue drains as fast as the engine decodes: seconds, not minutes


def overloaded(message: str, code: str, status: int = 429) -> APIError:
    return APIError(status, message, code=code, kind="rate_limit_error" if status == 429 else "server_error",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


class Admission:
    def __init__(self, per_caller: int):
        self.per_caller = per_caller
        self.in_flight: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # reason -> requests refused
        self.responses: Counter[int] = Counter()  # status -> generation requests answered
        self.disconnects = 0  # requests cancelled because their client left
        self.memories_dropped = 0  # memories left out of a chat's block for want of room

    def reject(self, reason: str | None) -> None:
        self.rejected[reason or "other"] += 1

    def within_fair_share(self, owner: str, queue_limit: int | None) -> bool:
        """Whether ``owner``'s requests in flight (this one included) are within its share of the queue,
        the limit split evenly among the callers with requests in flight. Such a request may pass a
        full queue: a queue full of other callers' backlog never turns a light caller away, and the
        queue stays under twice its limit (the shares add up to the limit once more)."""
        if queue_limit is None:
            return True
        return self.in_flight[owner] <= max(1, queue_limit // max(1, len(self.in_flight)))

    def acquire(self, owner: str):
        """Count one in-flight request of ``owner`` (429 when it has its limit already); returns the
        release, which may be called more than once."""
        if self.in_flight[owner] >= self.per_caller:
            self.reject("too_many_concurrent_requests")
            raise overloaded(f"you have {self.per_caller} requests in flight already, the most this server "
                             "allows one caller: wait for one to finish", "too_many_concurrent_requests")
        self.in_flight[owner] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight[owner] -= 1
                if not self.in_flight[owner]:
                    del self.in_flight[owner]

        return release


def metrics_text(engine, admission: Admission) -> str:
    """Prometheus exposition format (text 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP scalelab_{name} {doc}")
        lines.append(f"# TYPE scalelab_{name} {kind}")
        lines.extend(f"scalelab_{name}{labels} {value:g}" for labels, value in samples)

    metric("queue_depth", "gauge", "Engine requests waiting for a slot.", [("", engine.num_waiting)])
    metric("queue_limit", "gauge", "Most engine requests that may wait.", [("", engine.max_waiting or 0)])
    metric("running", "gauge", "Sequences being decoded now.", [("", engine.num_running)])
    metric("max_batch", "gauge", "Sequences decoded together at most.", [("", engine.max_batch)])
    metric("requests_in_flight", "gauge", "API requests being answered now.",
           [("", sum(admission.in_flight.values()))])
    metric("generated_tokens_total", "counter", "Tokens sampled since start.", [("", engine.tokens_generated)])
    metric("tokens_per_second", "gauge", "Tokens sampled per second over the last 10 s.",
           [("", round(engine.tokens_per_second(), 3))])
    metric("rejected_requests_total", "counter", "Requests refused before generation, by reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(admission.rejected.items())] or [('{reason="none"}', 0)])
    metric("parked", "gauge", "Sequences parked to give another caller its share of the batch.",
           [("", engine.num_parked)])
    metric("preemptions_total", "counter", "Sequences parked for another caller since start.",
           [("", engine.preemptions)])
    metric("queue_timeouts_total", "counter", "Engine requests that waited past the queue timeout.",
           [("", engine.queue_timeouts)])
    metric("responses_total", "counter", "Generation requests answered, by HTTP status.",
           [(f'{{status="{s}"}}', n) for s, n in sorted(admission.responses.items())] or [('{status="200"}', 0)])
    metric("client_disconnects_total", "counter", "Requests cancelled because their client went away.",
           [("", admission.disconnects)])
    metric("memories_dropped_total", "counter", "Memories left out of a chat for want of room in its budget.",
           [("", admission.memories_dropped)])
    metric("gc_frozen_objects", "gauge", "Objects from startup that garbage collections no longer walk.",
           [("", gc.get_freeze_count())])
    return "\n".join(lines) + "\n"
