"""Built-in post-training data over the synthetic world: an instruction mixture and preference pairs.

Instruction mixture (Flan-style): each task family renders the same underlying
fact or problem through several natural-language instruction phrasings, so the
model learns to follow instructions rather than to match one template.

Families: person_qa, comparison, arithmetic, formatting, classification,
extraction, profile, multi_turn. Every record is ``{"messages", "task",
"answer", "meta"}`` where ``answer`` is the final assistant reply; a family's
answers are exact, so PPO can use them as a verifiable reward.

Preference pairs encode correctness first and conciseness second: a correct
reply beats a wrong one whatever their lengths, and between two equally correct
replies the shorter one wins. ``bias="longer"`` flips only that second rule, a
known, planted bias for reward-hacking studies.
"""

from __future__ import annotations

import random
from typing import Callable

from scalelab.data.generators import generate
from scalelab.data.world import ATTRIBUTES, MONTHS, QUESTION_TEMPLATES, Person, World
from scalelab.errors import ScalelabError
from scalelab.posttrain.data import Preference

ATTRIBUTE_NOUNS = {
    "birth_date": "date of birth", "birth_city": "city of birth", "university": "university",
    "major": "field of study", "employer": "employer", "employer_city": "city of work",
}
CATEGORY_OF = {"birth_city": "city", "employer_city": "city", "university": "university",
               "employer": "company", "major": "field of study"}

QA_WRAPPERS = ("{q}", "Answer briefly: {q}", "{q} Reply with just the answer.", "Quick question. {q}")
COMPARE_EARLIER = ("Who was born earlier, {a} or {b}?", "Of {a} and {b}, who is older?",
                   "Which of these two people was born first: {a} or {b}?")
COMPARE_SAME = {
    "birth_city": ("Were {a} and {b} born in the same city?", "Do {a} and {b} share a birthplace?",
                   "Is {a}'s birthplace the same as {b}'s? Answer yes or no."),
    "employer": ("Do {a} and {b} work for the same company?", "Are {a} and {b} employed by the same company?",
                 "Is {a}'s employer the same as {b}'s? Answer yes or no."),
}
ARITHMETIC = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b} and reply with the number only.",
              "{a} {op} {b} = ?")
FORMATTING = {
    "upper": ("Write the name {name} in capital letters.", "Convert {name} to upper case.", "Spell {name} in all caps."),
    "last_first": ("Write {name} as 'last name, first name'.", "Reformat the name {name} so the surname comes first.",
                   "Put {name} in 'Surname, Given' order."),
    "iso_date": ("Give {name}'s birth date in YYYY-MM-DD format.", "Write the birth date of {name} as YYYY-MM-DD.",
                 "When was {name} born? Use the ISO format YYYY-MM-DD."),
}
CLASSIFY = ("Is {v} a city, a university, a company or a field of study?",
            "Classify '{v}' as one of: city, university, company, field of study.",
            "What kind of thing is {v}: a city, a university, a company or a field of study?")
EXTRACT = ("{bio}\n\nAccording to the text, what is the person's {noun}?",
           "Read this biography and extract the {noun}.\n\n{bio}",
           "Text: {bio}\nFrom the text alone, give the {noun} of the person described.")
PROFILE = ("Give a short profile of {name}.", "Tell me about {name} in a few sentences.",
           "Summarize what you know about {name}.")
FOLLOW_UP = ("Thanks. Next question: {q}", "Another one: {q}", "Now tell me: {q}")

VERBOSE = ("The answer is {a}.", "Sure! The answer is {a}. Let me know if you have any other questions.",
           "{a}. I am quite confident about this, because I checked it carefully.",
           "Good question. After thinking it over, I would say the answer is {a}.")


def _iso(date: str) -> str:
    month, day, year = date.replace(",", "").split()
    return f"{int(year):04d}-{MONTHS.index(month) + 1:02d}-{int(day):02d}"


def _birth_key(p: Person) -> tuple[int, int, int]:
    y, m, d = _iso(p.birth_date).split("-")
    return int(y), int(m), int(d)


def _last_first(name: str) -> str:
    first, middle, last = name.split()
    return f"{last}, {first} {middle}"


def _qa(question: str, answer: str, task: str, **meta) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "task": task, "answer": answer, "meta": meta}


# Each family: (world, people, rng) -> one record. meta["kind"] groups answers that are
# interchangeable as wrong answers for the preference generator.


def _person_qa(world: World, people: list[Person], rng: random.Random) -> dict:
    p, attr = rng.choice(people), rng.choice(ATTRIBUTES)
    q = rng.choice(QUESTION_TEMPLATES[attr]).format(name=p.name)
    i = rng.randrange(len(QA_WRAPPERS))
    return _qa(QA_WRAPPERS[i].format(q=q), p.attribute(attr), "person_qa", kind=attr, phrasing=i, person_id=p.id)


def _two(people: list[Person], rng: random.Random) -> tuple[Person, Person]:
    if len(people) < 2:
        raise ScalelabError("the comparison family needs a world with at least two people")
    a, b = rng.sample(people, 2)
    return a, b


def _comparison(world: World, people: list[Person], rng: random.Random) -> dict:
    a, b = _two(people, rng)
    if rng.random() < 0.5:
        while _birth_key(a) == _birth_key(b):
            a, b = _two(people, rng)
        i = rng.randrange(len(COMPARE_EARLIER))
        winner = a if _birth_key(a) < _birth_key(b) else b
        return _qa(COMPARE_EARLIER[i].format(a=a.name, b=b.name), winner.name, "comparison", kind="earlier",
                   phrasing=i, alternatives=[a.name, b.name])
    attr = rng.choice(sorted(COMPARE_SAME))
    if rng.random() < 0.5:  # same-valued pairs are rare by chance; make half the questions "yes"
        same = [q for q in people if q.id != a.id and q.attribute(attr) == a.attribute(attr)]
        b = rng.choice(same) if same else b
    i = rng.randrange(3)
    answer = "Yes" if a.attribute(attr) == b.attribute(attr) else "No"
    return _qa(COMPARE_SAME[attr][i].format(a=a.name, b=b.name), answer, "comparison", kind="yes_no", phrasing=i)


def _arithmetic(world: World, people: list[Person], rng: random.Random) -> dict:
    e = generate("arithmetic", 1, seed=rng.randrange(1 << 30), ops="+-*", max_digits=2)[0]
    i = rng.randrange(len(ARITHMETIC))
    return _qa(ARITHMETIC[i].format(a=e.meta["a"], op=e.meta["op"], b=e.meta["b"]), e.answer, "arithmetic",
               kind="number", phrasing=i)


def _formatting(world: World, people: list[Person], rng: random.Random) -> dict:
    p = rng.choice(people)
    kind = rng.choice(sorted(FORMATTING))
    answer = {"upper": p.name.upper(), "last_first": _last_first(p.name), "iso_date": _iso(p.birth_date)}[kind]
    i = rng.randrange(3)
    return _qa(FORMATTING[kind][i].format(name=p.name), answer, "formatting", kind=kind, phrasing=i)


def _classification(world: World, people: list[Person], rng: random.Random) -> dict:
    attr = rng.choice(sorted(CATEGORY_OF))
    v = rng.choice(people).attribute(attr)
    i = rng.randrange(len(CLASSIFY))
    return _qa(CLASSIFY[i].format(v=v), CATEGORY_OF[attr], "classification", kind="category", phrasing=i)


def _extraction(world: World, people: list[Person], rng: random.Random) -> dict:
    p, attr = rng.choice(people), rng.choice(ATTRIBUTES)
    bio = world.biography(p, rng)
    i = rng.randrange(len(EXTRACT))
    return _qa(EXTRACT[i].format(bio=bio, noun=ATTRIBUTE_NOUNS[attr]), p.attribute(attr), "extraction", kind=attr,
               phrasing=i, person_id=p.id)


def _profile(world: World, people: list[Person], rng: random.Random) -> dict:
    p = rng.choice(people)
    pron = p.pronoun.capitalize()
    answer = (f"{p.name} was born on {p.birth_date} in {p.birth_city}. {pron} studied {p.major} at {p.university}. "
              f"{pron} works for {p.employer} in {p.employer_city}.")
    i = rng.randrange(len(PROFILE))
    return _qa(PROFILE[i].format(name=p.name), answer, "profile", kind="profile", phrasing=i, person_id=p.id)


def _multi_turn(world: World, people: list[Person], rng: random.Random) -> dict:
    p = rng.choice(people)
    a1, a2 = rng.sample(ATTRIBUTES, 2)
    q1 = rng.choice(QUESTION_TEMPLATES[a1]).format(name=p.name)
    q2 = rng.choice(QUESTION_TEMPLATES[a2]).format(name=p.name)
    i = rng.randrange(len(FOLLOW_UP))
    messages = [{"role": "user", "content": q1}, {"role": "assistant", "content": p.attribute(a1)},
                {"role": "user", "content": FOLLOW_UP[i].format(q=q2)},
                {"role": "assistant", "content": p.attribute(a2)}]
    return {"messages": messages, "task": "multi_turn", "answer": p.attribute(a2),
            "meta": {"kind": a2, "phrasing": i, "person_id": p.id}}


FAMILIES: dict[str, Callable[[World, list[Person], random.Random], dict]] = {
    "person_qa": _person_qa, "comparison": _comparison, "arithmetic": _arithmetic, "formatting": _formatting,
    "classification": _classification, "extraction": _extraction, "profile": _profile, "multi_turn": _multi_turn,
}
# Families whose answer is short and exact: the ones preference pairs and verifiable rewards use.
SHORT_ANSWER_FAMILIES = ("person_qa", "comparison", "arithmetic", "formatting", "classification", "extraction")


def _check_families(families) -> list[str]:
    names = list(families) if families else list(FAMILIES)
    for f in names:
        if f not in FAMILIES:
            raise ScalelabError(f"unknown instruction family '{f}' (families: {', '.join(FAMILIES)})")
    return names


def _pool(world: World, people: list[int] | None) -> list[Person]:
    ids = [p.id for p in world.people if p.known] if people is None else list(people)
    pool = [world.people[i] for i in ids if 0 <= i < len(world.people)]
    if not pool:
        raise ScalelabError("the instruction mixture needs at least one (known) person in the world")
    return pool


def people_group(world: World, group: str) -> list[int] | None:
    """Person ids of a world split for the mixture: "known" (None: every known person), "qa_train" or "qa_eval".

    Drawing SFT facts from qa_train people only keeps the qa_eval people's facts for measuring
    whether tuning unlocks knowledge the model only read in pretraining.
    """
    if group == "known":
        return None
    splits = world.split_people()
    if group not in ("qa_train", "qa_eval"):
        raise ScalelabError(f"people must be one of known, qa_train, qa_eval, got {group!r}")
    return splits[group]


def instruction_mixture(world: World, n: int, seed: int = 0, families=None, people: list[int] | None = None) -> list[dict]:
    """``n`` records, families in equal shares (round robin, then shuffled); deterministic in (world, n, seed)."""
    names = _check_families(families)
    pool = _pool(world, people)
    rng = random.Random(f"mixture-{seed}")
    out = [FAMILIES[names[k % len(names)]](world, pool, rng) for k in range(n)]
    rng.shuffle(out)
    return out


def _candidates(rec: dict, wrong: str, rng: random.Random) -> dict[str, tuple[str, bool]]:
    """Four replies: correct/wrong × concise/verbose."""
    verbose = rng.choice(VERBOSE)
    return {"cc": (rec["answer"], True), "cv": (verbose.format(a=rec["answer"]), True),
            "wc": (wrong, False), "wv": (verbose.format(a=wrong), False)}


PAIR_TYPES = (("cc", "cv"), ("cc", "wc"), ("cc", "wv"), ("cv", "wc"), ("cv", "wv"), ("wc", "wv"))


def prefer(a: tuple[str, bool], b: tuple[str, bool], bias: str = "") -> bool:
    """True if reply ``a`` is preferred to ``b``: correctness first, then conciseness (or length, if biased)."""
    if a[1] != b[1]:
        return a[1]
    if bias == "longer":
        return len(a[0]) > len(b[0])
    return len(a[0]) < len(b[0])


def preference_pairs(world: World, n: int, seed: int = 0, bias: str = "", families=None,
                     people: list[int] | None = None) -> list[Preference]:
    """``n`` preference pairs over short-answer instruction tasks; meta says which rule decided each."""
    if bias not in ("", "longer"):
        raise ScalelabError(f"preference bias must be '' or 'longer', got {bias!r}")
    names = _check_families(families or SHORT_ANSWER_FAMILIES)
    items = instruction_mixture(world, max(4 * n, 64), seed=seed + 7919, families=names, people=people)
    # Wrong answers come from other records of the same kind: plausible, and certainly wrong.
    by_kind: dict[tuple[str, str], list[str]] = {}
    for r in items:
        by_kind.setdefault((r["task"], r["meta"]["kind"]), []).append(r["answer"])
    rng = random.Random(f"preferences-{seed}")
    out: list[Preference] = []
    for rec in items:
        if len(out) == n:
            break
        alternatives = rec["meta"].get("alternatives") or by_kind[(rec["task"], rec["meta"]["kind"])]
        wrongs = sorted({a for a in alternatives if a != rec["answer"]})
        if not wrongs:
            continue
        cands = _candidates(rec, rng.choice(wrongs), rng)
        x, y = PAIR_TYPES[len(out) % len(PAIR_TYPES)]
        a, b = cands[x], cands[y]
        if a[0] == b[0]:
            continue
        chosen, rejected = (a, b) if prefer(a, b, bias) else (b, a)
        rule = "correctness" if a[1] != b[1] else ("length_bias" if bias else "conciseness")
        prompt = rec["messages"][-2]["content"] if rec["task"] != "multi_turn" else rec["messages"][:-1]
        out.append(Preference(prompt, chosen[0], rejected[0], meta={
            "task": rec["task"], "rule": rule, "chosen_correct": chosen[1], "rejected_correct": rejected[1],
            "answer": rec["answer"]}))
    if len(out) < n:
        raise ScalelabError(f"could only build {len(out)} of {n} preference pairs from this world; use a larger world")
    return out


def exact_match_reward(reply: str, answer: str) -> float:
    """1 if the reply is the answer (case and surrounding space ignored), else 0: a verifiable reward."""
    return float(reply.strip().lower() == answer.strip().lower())
