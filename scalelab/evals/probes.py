"""Behaviour probes: small fixed question sets, each testing one dimension of behaviour.

Dimensions:

- ``number_comparison``: "Which is larger: 9.11 or 9.8?" — decimals whose digit count misleads.
- ``formatting``: answer a world question in a requested format (upper case, lower case, in brackets);
  the check is the format of the reply, the choice pits the right-format answer against the plain one.
- ``refusal``: questions about people who do not exist in the world; the right reply is "I don't know".
- ``arithmetic``: two-digit addition.

Every probe is asked zero-shot in a pretraining format (world QA's "Question: ...\\nAnswer:", the
arithmetic generator's "What is a + b?"). Each is
scored two ways: ``pass_rate`` checks the greedy reply, ``choice_accuracy`` asks whether the model's
log-likelihood prefers the right option over the wrong one(s), which shows a preference long before
a small model can produce the reply.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from scalelab.data.world import CITIES, FIRST_NAMES, LAST_NAMES, MIDDLE_INITIALS, QUESTION_TEMPLATES, render_qa
from scalelab.errors import ScalelabError
from scalelab.evals import metrics as M

DIMENSIONS = ("number_comparison", "formatting", "refusal", "arithmetic")
IDK = "I don't know"


@dataclass
class Probe:
    dimension: str
    prompt: str
    check: Callable[[str], bool]
    choices: tuple[str, ...]
    label: int


def _qa(question: str) -> str:
    return render_qa(question)


def _number_comparison(rng: random.Random, n: int) -> list[Probe]:
    out = []
    for i in range(n):
        whole = rng.randint(1, 20)
        if i % 2 == 0:  # the larger number is the shorter string: 9.8 vs 9.11
            short = rng.randint(2, 9)
            big, small = f"{whole}.{short}", f"{whole}.{rng.randint(10, 10 * short - 1)}"
        else:  # the larger number is the longer string: 9.37 vs 9.3
            short = rng.randint(1, 8)
            big, small = f"{whole}.{rng.randint(10 * short + 1, 99)}", f"{whole}.{short}"
        # Half of each kind, so a preference for short (likelier) strings scores one half, not one.
        a, b = (big, small) if rng.random() < 0.5 else (small, big)
        out.append(Probe("number_comparison", _qa(f"Which is larger: {a} or {b}?"),
                         lambda o, big=big: M.normalize_answer(o).rstrip(".") == big, (big, small), 0))
    return out


_FORMATS = {
    "upper": ("Reply in upper case.", str.upper),
    "lower": ("Reply in lower case.", str.lower),
    "brackets": ("Reply in square brackets.", lambda s: f"[{s}]"),
}


def _has_letters(text: str) -> bool:
    # a reply of digits alone ("1990") is in every case and shows no formatting
    return any(c.isalpha() for c in M.normalize_answer(text))


def _formatting(world, rng: random.Random, n: int) -> list[Probe]:
    pairs = world.qa_pairs(world.qa_train_people or None)
    out = []
    for q in rng.sample(pairs, min(n, len(pairs))):
        kind = rng.choice(sorted(_FORMATS))
        instruction, fmt = _FORMATS[kind]
        want = fmt(q.answer)
        # The check is the format alone: knowing the fact is world_qa's job.
        check = {"upper": lambda o: _has_letters(o) and M.normalize_answer(o) == M.normalize_answer(o).upper(),
                 "lower": lambda o: _has_letters(o) and M.normalize_answer(o) == M.normalize_answer(o).lower(),
                 "brackets": lambda o: re.fullmatch(r"\[.+\]", M.normalize_answer(o)) is not None}[kind]
        out.append(Probe("formatting", _qa(f"{q.question} {instruction}"), check, (want, q.answer), 0))
    return out


def _strangers(world, rng: random.Random, n: int) -> list[str]:
    """Full names that no person of the world has."""
    taken = {p.name for p in world.people} if world is not None else set()
    names: list[str] = []
    while len(names) < n:
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(MIDDLE_INITIALS)}. {rng.choice(LAST_NAMES)}"
        if name not in taken and name not in names:
            names.append(name)
    return names


def _refusal(world, rng: random.Random, n: int) -> list[Probe]:
    out = []
    for name in _strangers(world, rng, n):
        question = rng.choice(QUESTION_TEMPLATES["birth_city"]).format(name=name)
        out.append(Probe("refusal", _qa(question), lambda o: M.normalize_answer(o).lower().rstrip(".") in
                         ("i don't know", "i do not know"), (IDK, rng.choice(CITIES)), 0))
    return out


def _arithmetic(rng: random.Random, n: int) -> list[Probe]:
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        right = str(a + b)
        wrong = str(a + b + rng.choice((-10, -1, 1, 10)))
        out.append(Probe("arithmetic", f"What is {a} + {b}?", lambda o, r=right: M.exact_match(o, r), (right, wrong), 0))
    return out


def build_probes(world=None, n_per_dimension: int = 20, seed: int = 0) -> list[Probe]:
    """The probe set; formatting needs a world to ask about and is left out without one."""
    if n_per_dimension < 1:
        raise ScalelabError(f"probes need at least one item per dimension, got {n_per_dimension}")
    rng = random.Random(f"probes-{seed}")
    probes = _number_comparison(rng, n_per_dimension)
    if world is not None:
        probes += _formatting(world, rng, n_per_dimension)
    probes += _refusal(world, rng, n_per_dimension) + _arithmetic(rng, n_per_dimension)
    return probes


def run_probes(lm, probes: list[Probe], max_new_tokens: int = 16) -> dict:
    """{dimension: {"n", "pass_rate", "choice_accuracy", "samples"}}."""
    outputs = [lm.generate(p.prompt, max_new_tokens) for p in probes]
    lps = lm.continuation_logprobs([(p.prompt, " " + c) for p in probes for c in p.choices])
    result: dict = {}
    k = 0
    for p, out in zip(probes, outputs):
        lls = [sum(lp) for lp in lps[k : k + len(p.choices)]]
        k += len(p.choices)
        r = result.setdefault(p.dimension, {"passed": [], "chosen": [], "samples": []})
        r["passed"].append(float(p.check(out)))
        r["chosen"].append(float(M.choice_index(lls, list(p.choices)) == p.label))
        if len(r["samples"]) < 3:
            r["samples"].append({"prompt": p.prompt, "output": out})
    return {d: {"n": len(r["passed"]), "pass_rate": M.nanmean(r["passed"]), "choice_accuracy": M.nanmean(r["chosen"]),
                "samples": r["samples"]} for d, r in result.items()}


def format_probe_table(result: dict) -> str:
    lines = ["| probe | n | pass rate (greedy reply) | choice accuracy (log-likelihood) |", "|---|---|---|---|"]
    for d, r in result.items():
        lines.append(f"| {d} | {r['n']} | {r['pass_rate']:.3f} | {r['choice_accuracy']:.3f} |")
    return "\n".join(lines)
