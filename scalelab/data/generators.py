"""A registry of task generators over the synthetic world.

Every generator returns ``Example`` records: a ``prompt`` whose answer is the
continuation after one space, the ``answer``, and ``meta`` for scoring by
sub-skill (digit counts, attribute names, ...). ``Example.text`` is what goes
into pretraining text.

Adding a generator::

    @register("my_task")
    def my_task(n: int, rng: random.Random, *, difficulty: int = 1) -> list[Example]:
        '''Schema: prompt "...", answer "...", meta {...}. Params: difficulty (1-5).'''
        ...

Keyword-only parameters are the generator's params; ``generate`` rejects any
other name with a clear error. Document the schema in the docstring and in
docs/data_generators.md.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field
from typing import Callable

from scalelab.errors import ScalelabError


@dataclass
class Example:
    task: str
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


_REGISTRY: dict[str, Callable[..., list[Example]]] = {}


def register(name: str):
    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"generator '{name}' registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_generator(name: str) -> Callable[..., list[Example]]:
    if name not in _REGISTRY:
        raise ScalelabError(f"unknown task generator '{name}' (available: {', '.join(available())})")
    return _REGISTRY[name]


def generator_params(name: str) -> dict[str, object]:
    """The generator's parameters and their defaults."""
    sig = inspect.signature(get_generator(name))
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def generate(name: str, n: int, seed: int = 0, **params) -> list[Example]:
    fn = get_generator(name)
    allowed = generator_params(name)
    for key in params:
        if key not in allowed:
            raise ScalelabError(f"task generator '{name}' has no parameter '{key}' (parameters: {', '.join(allowed) or 'none'})")
    if n < 0:
        raise ScalelabError(f"number of examples must be >= 0, got {n}")
    return fn(n, random.Random(f"{name}-{seed}"), **params)


# -- arithmetic ---------------------------------------------------------------------------------------

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


@register("arithmetic")
def arithmetic(n: int, rng: random.Random, *, ops: str = "+*", min_digits: int = 1, max_digits: int = 3) -> list[Example]:
    """Integer arithmetic. Prompt "What is 123 + 45?", answer "168".

    Params: ops, a string of operators drawn uniformly from "+", "-", "*"; each operand has
    between min_digits and max_digits digits. meta: {"a", "b", "op", "digits"} where digits is
    the larger operand's digit count.
    """
    if not ops or any(o not in _OPS for o in ops):
        raise ScalelabError(f"arithmetic: ops must be made of + - *, got {ops!r}")
    if not 1 <= min_digits <= max_digits:
        raise ScalelabError(f"arithmetic: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    out = []
    for _ in range(n):
        op = rng.choice(ops)
        da, db = rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)
        a, b = _number(rng, da), _number(rng, db)
        out.append(Example("arithmetic", f"What is {a} {op} {b}?", str(_OPS[op](a, b)),
                           {"a": a, "b": b, "op": op, "digits": max(da, db)}))
    return out


@register("addition")
def addition(n: int, rng: random.Random, *, digits: int = 3) -> list[Example]:
    """Addition of two numbers of exactly ``digits`` digits. Schema as "arithmetic" (op "+")."""
    return [_retag(e, "addition") for e in arithmetic(n, rng, ops="+", min_digits=digits, max_digits=digits)]


@register("multiplication")
def multiplication(n: int, rng: random.Random, *, digits: int = 2) -> list[Example]:
    """Multiplication of two numbers of exactly ``digits`` digits. Schema as "arithmetic" (op "*")."""
    return [_retag(e, "multiplication") for e in arithmetic(n, rng, ops="*", min_digits=digits, max_digits=digits)]


def _retag(e: Example, task: str) -> Example:
    e.task = task
    return e


# -- world QA -----------------------------------------------------------------------------------------


@register("world_qa")
def world_qa(n: int, rng: random.Random, *, world_seed: int = 0, n_people: int = 400, split: str = "all") -> list[Example]:
    """QA over the synthetic world. Prompt "Question: Where was X born?\\nAnswer:", answer the value.

    Params: world_seed and n_people select the world (as data.world.seed / n_people);
    split is "all", "qa_train" (QA that pretraining shows), "qa_eval" (held out) or "unknown".
    meta: {"person_id", "attribute"}.
    """
    from scalelab.data.world import World, WorldConfig, render_qa

    world = World(WorldConfig(seed=world_seed, n_people=n_people))
    groups = {"all": None, "qa_train": world.qa_train_people, "qa_eval": world.qa_eval_people,
              "unknown": world.unknown_people}
    if split not in groups:
        raise ScalelabError(f"world_qa: split must be one of {', '.join(groups)}, got {split!r}")
    pairs = world.qa_pairs(groups[split])
    if not pairs:
        return []
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(n)]
    return [Example("world_qa", render_qa(q.question), q.answer, {"person_id": q.person_id, "attribute": q.attribute})
            for q in chosen]
