"""A registry of task generators: arithmetic, QA over the synthetic world, and whatever comes next.

Every generator returns ``Example`` records: a ``prompt`` whose answer is the
continuation after one space, the ``answer``, and ``meta`` for scoring by
sub-skill (digit counts, attribute names, ...). ``Example.text`` is what goes
into pretraining text.

Adding a generator::

    @register("my_task")
    def my_task(n: int, rng: random.Random, *, difficulty: int = 1) -> list[Example]:
        '''Schema: prompt "...", answer "...", meta {...}. Params: difficulty (1-5).'''
        ...

- ``rng`` is a ``random.Random`` that ``generate`` seeds from (name, seed); draw
  everything from it, never from the global ``random`` module.
- Keyword-only parameters with defaults are the generator's params; ``generate``
  rejects any other name, and a value whose type does not match an int/float/bool
  default, with a ``ScalelabError``. Check value ranges yourself, also with
  ``ScalelabError``.
- A keyword-only parameter named ``seed`` is not a user param: ``generate`` fills
  it with its own seed, for generators that build something else from it (a world).
- Document the schema in the docstring and in docs/data_generators.md.
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
    """Decorator adding a generator under ``name``; a name taken twice is a programming error."""

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


def _keyword_params(name: str) -> dict[str, object]:
    sig = inspect.signature(get_generator(name))
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def generator_params(name: str) -> dict[str, object]:
    """The generator's user parameters and their defaults."""
    return {k: v for k, v in _keyword_params(name).items() if k != "seed"}


def describe(name: str) -> str:
    """The generator's docstring: its schema and params."""
    return inspect.getdoc(get_generator(name)) or ""


def generate(name: str, n: int, seed: int = 0, **params) -> list[Example]:
    """``n`` examples of task ``name``; the same (name, n, seed, params) always gives the same list."""
    fn = get_generator(name)
    allowed = generator_params(name)
    for key, value in params.items():
        if key not in allowed:
            raise ScalelabError(
                f"task generator '{name}' has no parameter '{key}' (parameters: {', '.join(allowed) or 'none'})"
            )
        _check_type(name, key, value, allowed[key])
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ScalelabError(f"task generator '{name}': number of examples must be an integer >= 0, got {n!r}")
    if "seed" in _keyword_params(name):
        params["seed"] = seed
    return fn(n, random.Random(f"{name}-{seed}"), **params)


def _check_type(name: str, key: str, value: object, default: object) -> None:
    # Only scalar defaults are checked: a str/None/tuple default may accept several shapes.
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = True
    if not ok:
        raise ScalelabError(
            f"task generator '{name}': parameter '{key}' must be {type(default).__name__}, got {value!r}"
        )


# -- arithmetic ---------------------------------------------------------------------------------------

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_MAX_DIGITS = 40  # beyond this a "problem" is mostly a copying exercise; a typo guard more than a limit


def _number(rng: random.Random, digits: int) -> int:
    # 1-digit operands include 0; longer ones have no leading zero, so the digit count is exact.
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


@register("arithmetic")
def arithmetic(n: int, rng: random.Random, *, ops: str = "+*", min_digits: int = 1, max_digits: int = 3) -> list[Example]:
    """Integer arithmetic. Prompt "What is 123 + 45?", answer "168" (negative results as "-77").

    Params: ops, the operators to draw uniformly from, any of "+", "-", "*" (a string such as "+*" or
    a sequence of them); each operand independently has between min_digits and max_digits digits.
    meta: {"a", "b", "op", "digits"}, digits being the larger operand's digit count.
    """
    op_list = list(ops)
    if not op_list or any(o not in _OPS for o in op_list):
        raise ScalelabError(f"task generator 'arithmetic': ops must be made of + - *, got {ops!r}")
    if not 1 <= min_digits <= max_digits <= _MAX_DIGITS:
        raise ScalelabError(
            f"task generator 'arithmetic': need 1 <= min_digits <= max_digits <= {_MAX_DIGITS}, "
            f"got {min_digits}, {max_digits}"
        )
    out = []
    for _ in range(n):
        op = rng.choice(op_list)
        da, db = rng.randint(min_digits, max_digits), rng.randint(min_digits, max_digits)
        a, b = _number(rng, da), _number(rng, db)
        out.append(Example("arithmetic", f"What is {a} {op} {b}?", str(_OPS[op](a, b)),
                           {"a": a, "b": b, "op": op, "digits": max(da, db)}))
    return out


def _fixed_digits(task: str, op: str, n: int, rng: random.Random, digits: int) -> list[Example]:
    if not 1 <= digits <= _MAX_DIGITS:
        raise ScalelabError(f"task generator '{task}': digits must be between 1 and {_MAX_DIGITS}, got {digits}")
    examples = arithmetic(n, rng, ops=op, min_digits=digits, max_digits=digits)
    for e in examples:
        e.task = task
    return examples


@register("addition")
def addition(n: int, rng: random.Random, *, digits: int = 3) -> list[Example]:
    """Addition of two numbers of exactly ``digits`` digits. Schema as "arithmetic", op "+"."""
    return _fixed_digits("addition", "+", n, rng, digits)


@register("multiplication")
def multiplication(n: int, rng: random.Random, *, digits: int = 2) -> list[Example]:
    """Multiplication of two numbers of exactly ``digits`` digits. Schema as "arithmetic", op "*"."""
    return _fixed_digits("multiplication", "*", n, rng, digits)


# -- world QA -----------------------------------------------------------------------------------------

_WORLD_SPLITS = ("all", "qa_train", "qa_eval", "unknown")


@register("world_qa")
def world_qa(n: int, rng: random.Random, *, world_seed: int | None = None, n_people: int = 400,
             unknown_fraction: float = 0.0, qa_in_pretrain_fraction: float = 0.5, split: str = "all",
             seed: int = 0) -> list[Example]:
    """QA over the synthetic world. Prompt "Question: Where was X B. Y born?\\nAnswer:", answer "Port Alder".

    Params: world_seed (default: the seed passed to generate), n_people, unknown_fraction and
    qa_in_pretrain_fraction select the world exactly as the data.world fields of the same names, so
    pass the run's values to get its splits. split is "all", "qa_train" (QA that pretraining shows),
    "qa_eval" (known people, QA held out) or "unknown" (people pretraining never mentions).
    Questions are drawn without repeats until the split's pool (every template of every attribute)
    runs out, then the pool is reshuffled. meta: {"person_id", "attribute", "split"}.
    """
    from scalelab.data.world import World, WorldConfig, render_qa

    if split not in _WORLD_SPLITS:
        raise ScalelabError(f"task generator 'world_qa': split must be one of {', '.join(_WORLD_SPLITS)}, got {split!r}")
    cfg = WorldConfig(seed=seed if world_seed is None else world_seed, n_people=n_people,
                      unknown_fraction=unknown_fraction, qa_in_pretrain_fraction=qa_in_pretrain_fraction,
                      extra_tasks={})
    world = World(cfg)
    groups = world.split_people()
    pool = world.qa_pairs(None if split == "all" else groups[split])
    if not pool:
        if n == 0:
            return []
        raise ScalelabError(f"task generator 'world_qa': split '{split}' has no people in this world "
                            f"(unknown_fraction={unknown_fraction}, qa_in_pretrain_fraction={qa_in_pretrain_fraction})")
    chosen = []
    while len(chosen) < n:
        batch = list(pool)
        rng.shuffle(batch)
        chosen.extend(batch[: n - len(chosen)])
    return [Example("world_qa", render_qa(q.question), q.answer,
                    {"person_id": q.person_id, "attribute": q.attribute, "split": split}) for q in chosen]


# The reasoning tasks register their chain-of-thought generators (cot_addition, countdown, sudoku4, ...)
# from their own modules; imported last because those modules import ``register`` from this one.
import scalelab.tasks  # noqa: E402,F401
