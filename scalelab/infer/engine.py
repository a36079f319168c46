"""The inference engine: batched, continuously batched, streaming generation with a KV cache.
The scheduler and decode loop; what callers submit and get back is in scalelab/infer/request.py.

    engine = Engine(model, tokenizer, max_batch=8)
    outs = engine.generate([ids_a, ids_b], GenerationParams(max_new_tokens=32, temperature=0.0))

Design
- Every running sequence owns one slot of a :class:`SlotKVCache`; each slot
  has its own length, so sequences of different lengths decode together.
- A scheduler step first advances every running sequence by one token (one
  forward pass of shape (B, 1)), retires the finished ones, then admits waiting
  requests into the free slots with one right-padded prefill. Requests thus join
  and leave a running batch between decode steps (continuous batching).
- A free slot goes to the waiting request whose owner (the caller that sent
  it; all None outside a server) has the fewest sequences running, and among
  equals to the owner served longest ago: one caller's backlog does not stand
  in front of everybody else's requests. Within one owner, first come, first served.
- With no slot free, a request whose owner runs fewer sequences than another
  owner by more than it needs takes a slot from that owner: the other owner's
  least advanced sequence is parked (its slot freed; its tokens, sampler state,
  streamed text and a copy of its keys and values kept) and later resumed by
  copying its keys and values into a free slot, so it goes on as if never
  stopped. (Rebuilding them with a prefill instead cost a forward pass over up
  to the whole context for every resume, and a light caller's every request
  caused one: the batch stalled for it.) Without owners (one user) nothing is
  ever parked.
- A prompt with ``n`` samples is prefilled once; its cache row is copied to the
  other samples' slots.
- Each sample draws from its own ``torch.Generator`` seeded from the request's
  seed, so its tokens do not depend on which requests share the batch.
- ``start()`` runs the scheduler on a background thread for the server;
  without it, ``generate`` and ``stream`` drive the steps in the calling thread.
- ``compile=True`` decodes every slot every step (free ones on a dummy token), so
  the step's shapes are fixed but for the key span, which is one symbolic size:
  ``torch.compile`` (with weight freezing, i.e. prepacked matmul weights) compiles
  it once, on the first decode step (seconds). The prefill stays eager. The weights
  are baked in at compile time: use it to serve a fixed checkpoint, not a model
  that is still training.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import queue
import threading
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from scalelab.errors import ScalelabError
from scalelab.infer.cache import SlotKVCache, StaticDecode
from scalelab.infer.head import OutputHead
from scalelab.infer.request import (  # noqa: F401 (re-exported: callers import these from the engine)
    Completion, GenerationParams, QueueFull, QueueTimeout, Request, TokenEvent, safe_text_end)
from scalelab.infer.sample import cut_at_stop, filter_logits
from scalelab.model.gpt import GPT


def _sample_seed(seed: int, index: int) -> int:
    # Sample 0 keeps the request seed, so n=1 matches scalelab.infer.sample.generate draw for draw.
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little") >> 1


def _logprob_temperature(params: GenerationParams) -> float:
    return params.temperature if params.logprobs_at_temperature and params.temperature > 0 else 1.0



@dataclass(eq=False)
class _Seq:
    req: Request
    index: int
    slot: int
    max_new: int
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    stop_logprob: float | None = None
    pending: int | None = None  # last sampled token, not yet in the cache
    sent: int = 0  # characters of text already streamed
    # text of tokens[:decoded], which ends on a character boundary: each step decodes only the tokens
    # after it, so a step costs the same at token 1000 as at token 10 (a full decode each step is O(n))
    decoded_text: str = ""
    decoded: int = 0
    saved_cache: tuple | None = None  # while parked: its slot's keys and values (SlotKVCache.save_slot)


# freezing: weights become constants, so linear layers use prepacked weights. cpp_wrapper: the graph's
# kernels are launched from generated C++ rather than a Python function, which took 2-10% off a batch-16
# decode step of a 13.8M model on 2 CPU threads (bench/compiled_decode_ab.py). cpp.enable_concat_linear
# merges the q/k/v and gate/up matmuls that read the same input into one wider matmul each (7 matmuls a
# layer become 4): 0-7% off the same step (same bench, --b cpp.enable_concat_linear=true). max-autotune's
# CPP GEMMs gave no gain we could measure.
_INDUCTOR_OPTIONS = {"freezing": True, "cpp_wrapper": True, "cpp.enable_concat_linear": True}


class _DecodeAllSlots(torch.nn.Module):
    """What torch.compile sees: every shape is fixed by max_batch, but the key span. It stops at the final
    norm's hidden states; the engine applies the output layer.

    A module (not a function taking the model) so that freezing sees the weights as parameters.
    """

    def __init__(self, model, hidden_only: bool):
        super().__init__()
        self.model = model
        self.hidden_only = hidden_only

    def forward(self, k, v, idx, pos, keys) -> torch.Tensor:
        if self.hidden_only:
            return self.model.hidden_states(idx, cache=StaticDecode(k, v, pos, keys))[:, -1]
        return self.model(idx, cache=StaticDecode(k, v, pos, keys))[:, -1]


# tokens per second is measured over this many recent seconds
RATE_WINDOW_S = 10.0


class Engine:
    """``max_waiting`` bounds the queue of requests not yet admitted (None: unbounded); past it,
    :meth:`submit_many` raises :class:`QueueFull` rather than letting the queue, and every later
    request's wait, grow without end."""

    def __init__(self, model, tokenizer, device=None, max_batch: int = 8, compile: bool = False,
                 max_waiting: int | None = None):
        if max_batch < 1:
            raise ScalelabError("max_batch must be at least 1")
        if max_waiting is not None and max_waiting < 1:
            raise ScalelabError("max_waiting must be at least 1")
        self.max_waiting = max_waiting
        self.tokens_generated = 0  # every sampled token since start (stop tokens included)
        self.queue_timeouts = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for the rate
        self._admissions = 0
        self._last_served: dict[str | None, int] = {}  # owner -> admission count when last admitted
        self.model = model.eval()
        self.tokenizer = tokenizer
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self.context = model.config.block_size
        self.max_batch = max_batch
        self.cache = SlotKVCache(model.config, max_batch, self.context, device=self.device, dtype=p.dtype)
        self._free = list(range(max_batch))  # a heap: lowest slot first keeps the batch a contiguous view
        self._running: list[_Seq] = []
        self._parked: list[_Seq] = []  # preempted for another owner: no slot until resumed
        self.preemptions = 0
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._head = OutputHead(model.lm_head)
        # a model class that overrides forward may change the logits (a steered or instrumented model):
        # then the engine calls forward and picks positions from its logits instead of applying the head itself
        self._own_head = type(model).forward is GPT.forward
        self._compiled = None
        if compile:
            # isolated: other engines' graphs (other models, other max_batch) do not use up this one's limit
            self._compiled = torch.compile(
                _DecodeAllSlots(self.model, self._own_head), dynamic=False, fullgraph=True, recompile_limit=4, isolate_recompiles=True,
            )

    @property
    def compiled(self) -> bool:
        """Whether decode steps run the compiled static-shape path (it falls back to eager if compiling fails)."""
        return self._compiled is not None

    # -- public API ----------------------------------------------------------------------------------

    def check(self, prompt: list[int], params: GenerationParams) -> list[int]:
        """The prompt as it will run, or a ScalelabError saying why it cannot."""
        if not prompt:
            raise ScalelabError("empty prompt: give at least one token (e.g. the BOS token)")
        if params.max_new_tokens < 0:
            raise ScalelabError("max_new_tokens must be >= 0")
        if not 1 <= params.n <= self.max_batch:
            raise ScalelabError(f"n must be between 1 and the engine's max_batch ({self.max_batch})")
        if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0:
            raise ScalelabError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        if params.truncate_prompt:
            # cut only a prompt that does not fit, and then leave the reply its tokens, or a quarter of
            # the context when it asks for more (chat asks for the whole context by default)
            reserve = max(1, min(params.max_new_tokens, self.context // 4))
            if len(prompt) > self.context - reserve:
                return list(prompt[-(self.context - reserve):])
            return list(prompt)
        if len(prompt) > self.context:
            raise ScalelabError(
                f"prompt of {len(prompt)} tokens is longer than the model's context of {self.context} "
                "(truncate it, or opt in to truncation with truncate_prompt=True)"
            )
        return list(prompt)

    def submit(self, prompt: list[int], params: GenerationParams, on_event: Callable | None = None,
               prompt_index: int = 0, queue_timeout: float | None = None, over_limit: bool = False,
               owner: str | None = None) -> Request:
        """Queue one prompt (validated now, so errors reach the caller); it joins the batch at the next step."""
        return self.submit_many([(prompt, params, on_event, prompt_index)], queue_timeout, over_limit, owner)[0]

    def submit_many(self, items: list[tuple], queue_timeout: float | None = None,
                    over_limit: bool = False, owner: str | None = None) -> list[Request]:
        """Queue (prompt, params, on_event, prompt_index) items all together or not at all.

        Raises QueueFull when they would take the queue past ``max_waiting`` (``over_limit``
        skips that check: a request already accepted continuing after a tool call). A request
        still waiting ``queue_timeout`` seconds from now is closed with a QueueTimeout error."""
        reqs = []
        for prompt, params, on_event, prompt_index in items:
            if params.seed is None:
                params = GenerationParams(**{**params.__dict__, "seed": int.from_bytes(os.urandom(7), "little")})
            reqs.append(Request(self.check(prompt, params), params, on_event, prompt_index))
        deadline = None if queue_timeout is None else time.monotonic() + queue_timeout
        with self._cv:
            if not over_limit and self.max_waiting is not None and len(self._waiting) + len(reqs) > self.max_waiting:
                raise QueueFull(f"the server's queue is full ({self.max_waiting} requests waiting)")
            for req in reqs:
                req.deadline, req.owner = deadline, owner
                self._waiting.append(req)
            self._cv.notify_all()
        return reqs

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Completion]:
        """Completions for every prompt, prompt-major: prompt i's samples are [i*n, (i+1)*n)."""
        for p in prompts:
            self.check(p, params)
        reqs = [self.submit(p, params, prompt_index=i) for i, p in enumerate(prompts)]
        if self._thread is None:
            while not all(r.done for r in reqs):
                self.step()
        return [c for r in reqs for c in r.wait()]

    def stream(self, prompt: list[int], params: GenerationParams) -> Iterator[TokenEvent]:
        """TokenEvents of one prompt as they are produced; closing the iterator early cancels the request."""
        events: queue.Queue = queue.Queue()
        req = self.submit(prompt, params, on_event=events.put)
        try:
            while True:
                if self._thread is None:
                    while events.empty() and not req.done:
                        self.step()
                ev = events.get()
                if ev is None:
                    break
                yield ev
            if req.error is not None:
                raise req.error
        finally:
            req.cancel()

    def start(self) -> "Engine":
        """Run the scheduler on a background thread (for servers)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="scalelab-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    def tokens_per_second(self) -> float:
        """Tokens sampled per second over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        with self._cv:
            recent = [(t, n) for t, n in self._recent if t > now - RATE_WINDOW_S]
        return sum(n for _, n in recent) / RATE_WINDOW_S

    # -- scheduling ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._running and not self._parked:
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:  # already reported to the requests it failed; keep serving the others
                traceback.print_exc()
        for s in self._running + self._parked:
            s.req.cancel()
        self._retire_cancelled()
        with self._cv:
            while self._waiting:
                self._waiting.popleft()._close()

    def step(self) -> bool:
        """One decode step for the running batch, then admit waiting requests. Returns whether it did work."""
        with self._step_lock, torch.inference_mode():
            admitted: list[tuple[Request, list[int]]] = []
            try:
                self._retire_cancelled()
                decoding = [s for s in self._running if s.pending is not None]
                if decoding:
                    self._decode(decoding)
                admitted, resumed = self._admit()
                if resumed:
                    self._resume(resumed)
                if admitted:
                    self._prefill(admitted)
                return bool(decoding or admitted or resumed)
            except Exception as e:  # a bug or out-of-memory: fail the requests in flight, keep the engine usable
                self._fail_running(e, [r for r, _ in admitted])
                raise

    def _drop_stale_waiting(self) -> None:
        # anywhere in the queue, not just at its head: a bounded queue must not fill up with the dead
        now = time.monotonic()
        keep: deque[Request] = deque()
        for req in self._waiting:
            if req.cancelled:
                req._close()
            elif req.deadline is not None and now > req.deadline:
                req.error = QueueTimeout("the request waited too long in the server's queue")
                self.queue_timeouts += 1
                req._close()
            else:
                keep.append(req)
        self._waiting = keep

    def _admit(self) -> tuple[list[tuple[Request, list[int]]], list[_Seq]]:
        """Requests to prefill into free slots, and parked sequences given a slot back (in _running already)."""
        admitted, resumed = [], []
        with self._cv:
            self._drop_stale_waiting()
            running: dict[str | None, int] = {}
            for s in self._running:
                running[s.req.owner] = running.get(s.req.owner, 0) + 1
            while self._waiting or self._parked:
                heads: dict[str | None, Request | _Seq] = {}
                for c in [*self._parked, *self._waiting]:  # each owner's earliest, parked ones first
                    heads.setdefault(c.req.owner if isinstance(c, _Seq) else c.owner, c)
                owner, c = min(heads.items(), key=lambda kv: (running.get(kv[0], 0), self._last_served.get(kv[0], -1)))
                if isinstance(c, Request) and (c.params.max_new_tokens == 0 or len(c.prompt) >= self.context):
                    self._waiting.remove(c)
                    self._finish_empty(c)
                    continue
                need = 1 if isinstance(c, _Seq) else c.params.n
                if need > len(self._free):
                    if self._park_for(owner, need, running, resumed):
                        continue
                    break  # the chosen one waits for room: later ones do not overtake a big one
                running[owner] = running.get(owner, 0) + need
                self._admissions += 1
                self._last_served[owner] = self._admissions
                if len(self._last_served) > 4096:  # forget owners with nothing queued: their turn is spent
                    self._last_served = {r.owner: self._last_served.get(r.owner, -1) for r in self._waiting}
                if isinstance(c, _Seq):
                    self._parked.remove(c)
                    c.slot = heapq.heappop(self._free)
                    self._running.append(c)
                    resumed.append(c)
                else:
                    self._waiting.remove(c)
                    admitted.append((c, [heapq.heappop(self._free) for _ in range(need)]))
        return admitted, resumed

    def _park_for(self, owner: str | None, need: int, running: dict, resumed: list[_Seq]) -> bool:
        """Free a slot for ``owner`` by parking a sequence of the owner running the most, if that owner
        would still run more than ``owner`` afterwards; False when no one is that far ahead."""
        others = {o: n for o, n in running.items() if o != owner and n > 0}
        if not others:
            return False
        victim_owner = max(others, key=others.get)
        if others[victim_owner] <= running.get(owner, 0) + need:
            return False
        # not one given its slot back in this same round: its cache is not rebuilt yet
        candidates = [s for s in self._running
                      if s.req.owner == victim_owner and s.pending is not None and s not in resumed]
        if not candidates:
            return False
        victim = min(candidates, key=lambda s: len(s.tokens))  # the least work to redo
        self._running.remove(victim)
        victim.saved_cache = self.cache.save_slot(victim.slot)
        self.cache.release(victim.slot)
        heapq.heappush(self._free, victim.slot)
        victim.slot = -1
        self._parked.append(victim)
        running[victim_owner] -= 1
        self.preemptions += 1
        return True

    def _resume(self, seqs: list[_Seq]) -> None:
        """Give parked sequences their caches back in their new slots: their prompt and tokens but the
        last, which is still pending."""
        for s in seqs:
            self.cache.restore_slot(s.slot, s.saved_cache)
            s.saved_cache = None

    def _finish_empty(self, req: Request) -> None:
        for i in range(req.params.n):
            logprobs = [] if req.params.logprobs else None
            req.results[i] = Completion(req.prompt_index, i, [], "", "length", len(req.prompt), logprobs)
            req._emit(TokenEvent(i, None, "", None, "length"))
        req._close()

    def _prefill(self, admitted: list[tuple[Request, list[int]]]) -> None:
        reqs = [r for r, _ in admitted]
        lengths = [len(r.prompt) for r in reqs]
        T = max(lengths)
        idx = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, r in enumerate(reqs):
            idx[i, : len(r.prompt)] = torch.tensor(r.prompt)
        firsts = [slots[0] for _, slots in admitted]
        self.cache.begin_prefill(firsts, lengths)
        # the output layer on each prompt's last position only: all B x T logits cost more than the blocks
        last = self._forward(idx.to(self.device), self.cache, torch.tensor(lengths, device=self.device) - 1)
        seqs, rows = [], []
        for i, (r, slots) in enumerate(admitted):
            p = r.params
            max_new = min(p.max_new_tokens, self.context - len(r.prompt))
            for j, slot in enumerate(slots):
                if j:
                    self.cache.copy_slot(firsts[i], slot)
                gen = None
                if p.temperature > 0:
                    gen = torch.Generator(device=self.device).manual_seed(_sample_seed(p.seed, j))
                seq = _Seq(r, j, slot, max_new, gen)
                self._running.append(seq)
                seqs.append(seq)
                rows.append(i)
        self._sample_and_accept(seqs, last[torch.tensor(rows, device=last.device)])

    def _decode(self, seqs: list[_Seq]) -> None:
        seqs = sorted(seqs, key=lambda s: s.slot)
        logits = self._decode_static(seqs) if self._compiled is not None else None
        if logits is None:
            self.cache.begin_decode([s.slot for s in seqs])
            idx = torch.tensor([[s.pending] for s in seqs], dtype=torch.long, device=self.device)
            logits = self._forward(idx, self.cache, torch.zeros(len(seqs), dtype=torch.long, device=self.device))
        self._sample_and_accept(seqs, logits)

    def _decode_static(self, seqs: list[_Seq]) -> torch.Tensor | None:
        slots = [s.slot for s in seqs]
        tokens = [0] * self.max_batch
        for s in seqs:
            tokens[s.slot] = s.pending
        # every slot writes its dummy or real key at its own length: past any real key, so harmless
        lengths = self.cache.lengths
        idx = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        keys = torch.arange(max(lengths) + 1, device=self.device)
        torch._dynamo.mark_dynamic(keys, 0)  # one graph for every span, not one per span
        try:
            # read when the graph compiles; torch.compile(options=...) does not pass freezing on (torch 2.13)
            with torch._inductor.config.patch(_INDUCTOR_OPTIONS):
                hidden = self._compiled(self.cache.k, self.cache.v, idx, pos, keys)
        except Exception as e:  # no C++ compiler, an unsupported op...: decode eagerly from now on
            warnings.warn(f"compiled decode failed, decoding eagerly instead: {type(e).__name__}: {e}")
            self._compiled = None
            return None
        self.cache.advance_slots(slots)
        if len(slots) < self.max_batch:  # free slots decoded a dummy token: no logits for them
            hidden = hidden[torch.tensor(slots, device=hidden.device)]
        # the output layer outside the graph: freezing prepacks fp32 weights for MKL, whose packed sgemm ran
        # SmolLM2's 576 -> 49152 head 1.6x slower than oneDNN's layout (OutputHead) at batch 16 and 24, though
        # 13% faster at batch 1 (bench/output_head.py); batches are what the engine is for
        return self._head(hidden) if self._own_head else hidden

    def _forward(self, idx: torch.Tensor, cache, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) at one position per row of ``idx``, with the cache updated for all of them."""
        rows = torch.arange(idx.shape[0], device=idx.device)
        if self._own_head:
            return self._head(self.model.hidden_states(idx, cache=cache)[rows, positions])
        return self.model(idx, cache=cache)[rows, positions]

    def _sample_and_accept(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        logits = logits.float()
        now = time.monotonic()
        with self._cv:
            self.tokens_generated += len(seqs)
            self._recent.append((now, len(seqs)))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
        greedy = [i for i, s in enumerate(seqs) if s.gen is None]
        chosen = [0] * len(seqs)
        if greedy:
            picks = (logits if len(greedy) == len(seqs) else logits[greedy]).argmax(-1).tolist()
            for i, t in zip(greedy, picks):
                chosen[i] = t
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            if s.gen is not None:
                p = s.req.params
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for (temperature, top_k, top_p), rows in groups.items():  # one filter per setting, one draw per sample
            probs = filter_logits(logits[rows], temperature, top_k, top_p).softmax(-1)
            for r, i in enumerate(rows):
                chosen[i] = int(torch.multinomial(probs[r : r + 1], 1, generator=seqs[i].gen))
        want = [i for i, s in enumerate(seqs) if s.req.params.logprobs]
        lps: dict[int, float] = {}
        tops: dict[int, list[tuple[int, float]]] = {}
        if want:
            rows = torch.tensor(want, device=logits.device)
            cols = torch.tensor([chosen[i] for i in want], device=logits.device)
            scale = torch.tensor([_logprob_temperature(seqs[i].req.params) for i in want], device=logits.device)
            logp = (logits[rows] / scale[:, None]).log_softmax(-1)
            vals = logp[torch.arange(len(want), device=logits.device), cols].tolist()
            lps = dict(zip(want, vals))
            k = min(max(seqs[i].req.params.top_logprobs for i in want), logp.shape[-1])
            if k > 0:
                top_vals, top_ids = (t.tolist() for t in logp.topk(k, dim=-1))
                for r, i in enumerate(want):
                    ki = seqs[i].req.params.top_logprobs
                    if ki > 0:
                        tops[i] = list(zip(top_ids[r][:ki], top_vals[r][:ki]))
        for i, s in enumerate(seqs):
            self._accept(s, chosen[i], lps.get(i), tops.get(i))

    def _accept(self, seq: _Seq, tok: int, lp: float | None, top: list[tuple[int, float]] | None = None) -> None:
        p = seq.req.params
        reason = None
        if tok in p.stop_token_ids:
            reason, tok, lp, top, seq.stop_logprob = "stop", None, None, None, lp
        else:
            seq.tokens.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            if top is not None:
                seq.top_logprobs.append(top)
        if reason is None and not p.stop_strings and seq.req.on_event is None and len(seq.tokens) < seq.max_new:
            # nobody reads this text before the end (no stream, no stop string): decode it once, then
            seq.pending = tok
            return
        text = self._text(seq)
        if p.stop_strings:
            cut = cut_at_stop(text, p.stop_strings)
            if len(cut) < len(text):
                reason, text = "stop", cut
        if reason is None and len(seq.tokens) >= seq.max_new:
            reason = "length"
        end = len(text) if reason else safe_text_end(text, p.stop_strings)
        delta = text[seq.sent : end] if end > seq.sent else ""
        seq.sent = max(seq.sent, end)
        seq.req._emit(TokenEvent(seq.index, tok, delta, lp, reason, top))
        if reason is None:
            seq.pending = tok
            return
        seq.req.results[seq.index] = Completion(
            seq.req.prompt_index, seq.index, seq.tokens, text, reason, len(seq.req.prompt),
            seq.logprobs if p.logprobs else None, seq.stop_logprob,
            seq.top_logprobs if p.logprobs and p.top_logprobs else None,
        )
        self._release(seq)

    def _text(self, seq: _Seq) -> str:
        tail = self.tokenizer.decode(seq.tokens[seq.decoded :])
        if tail.endswith("\ufffd"):  # a multi-byte character still split across tokens: provisional
            return seq.decoded_text + tail
        seq.decoded_text += tail
        seq.decoded = len(seq.tokens)
        return seq.decoded_text

    def _release(self, seq: _Seq) -> None:
        if seq.slot < 0:  # parked: it holds no slot
            self._parked.remove(seq)
            seq.saved_cache = None
        else:
            self._running.remove(seq)
            self.cache.release(seq.slot)
            heapq.heappush(self._free, seq.slot)
        seq.req._open -= 1
        if seq.req._open == 0:
            seq.req._close()

    def _retire_cancelled(self) -> None:
        for s in [s for s in self._running + self._parked if s.req.cancelled]:
            if s.req.results[s.index] is None:
                text = self.tokenizer.decode(s.tokens)
                p = s.req.params
                s.req.results[s.index] = Completion(
                    s.req.prompt_index, s.index, s.tokens, text, "cancelled", len(s.req.prompt),
                    s.logprobs if p.logprobs else None, None,
                    s.top_logprobs if p.logprobs and p.top_logprobs else None,
                )
            self._release(s)

    def _fail_running(self, error: BaseException, admitting: list[Request]) -> None:
        for s in self._running + self._parked:
            s.req.error = error
            self._release(s)
        for r in admitting:
            if not r.done:
                r.error = error
                r._close()
        # slots of admitted requests that never became sequences go back to the pool
        used = {s.slot for s in self._running}
        self._free = [i for i in range(self.max_batch) if i not in used]
        heapq.heapify(self._free)
