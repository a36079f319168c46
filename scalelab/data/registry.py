"""The registry of task generators: arithmetic, QA over the synthetic world, and whatever comes next.

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

import importlib
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

# The built-in generators, registered when their module is imported. They are loaded by name on the
# registry's first use, not imported here: each of them imports ``register`` from this module, and the
# world QA generator needs ``World``, which itself draws its extra pretraining tasks from this registry.
BUILTIN_MODULES = ("scalelab.data.generators", "scalelab.tasks")
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def register(name: str):
    """Decorator adding a generator under ``name``; a name taken twice is a programming error."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"generator '{name}' registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_generator(name: str) -> Callable[..., list[Example]]:
    _load_builtins()
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
