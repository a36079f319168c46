import random

import pytest

from scalelab.data import registry
from scalelab.data import generators as g
from scalelab.data.generators import Example, available, describe, generate, generator_params, get_generator
from scalelab.data.world import World, WorldConfig
from scalelab.errors import ScalelabError


def test_registry_lists_the_builtin_generators_with_docs():
    assert {"arithmetic", "addition", "multiplication", "world_qa"} <= set(available())
    assert available() == sorted(available())
    for name in available():
        assert describe(name)  # every generator documents its schema
    assert generator_params("arithmetic") == {"ops": "+*", "min_digits": 1, "max_digits": 3}
    assert "seed" not in generator_params("world_qa")


@pytest.mark.parametrize("name", ["arithmetic", "addition", "multiplication", "world_qa"])
def test_generators_are_deterministic_in_their_seed(name):
    a = generate(name, 30, seed=1, **({"n_people": 20} if name == "world_qa" else {}))
    b = generate(name, 30, seed=1, **({"n_people": 20} if name == "world_qa" else {}))
    c = generate(name, 30, seed=2, **({"n_people": 20} if name == "world_qa" else {}))
    assert a == b and a != c and len(a) == 30
    assert all(isinstance(e, Example) and e.task == name and e.text == f"{e.prompt} {e.answer}" for e in a)
    assert generate(name, 0, seed=1, **({"n_people": 20} if name == "world_qa" else {})) == []


def test_arithmetic_answers_are_correct():
    examples = generate("arithmetic", 300, seed=1, ops="+-*", max_digits=4)
    assert {e.meta["op"] for e in examples} == {"+", "-", "*"}
    for e in examples:
        a, b, op = e.meta["a"], e.meta["b"], e.meta["op"]
        assert e.prompt == f"What is {a} {op} {b}?"
        assert int(e.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert e.meta["digits"] == max(len(str(a)), len(str(b)))
    assert {e.meta["op"] for e in generate("arithmetic", 50, seed=0, ops=("*",))} == {"*"}


def test_addition_and_multiplication_fix_the_digit_count():
    adds = generate("addition", 50, seed=0, digits=5)
    assert all(len(str(e.meta["a"])) == len(str(e.meta["b"])) == 5 and e.meta["op"] == "+" for e in adds)
    assert all(int(e.answer) == e.meta["a"] + e.meta["b"] for e in adds)
    muls = generate("multiplication", 50, seed=0, digits=3)
    assert all(e.meta["digits"] == 3 and int(e.answer) == e.meta["a"] * e.meta["b"] for e in muls)


def test_world_qa_draws_from_the_requested_split_of_the_matching_world():
    w = World(WorldConfig(seed=5, n_people=30, unknown_fraction=0.2, qa_in_pretrain_fraction=0.5))
    params = dict(n_people=30, unknown_fraction=0.2, qa_in_pretrain_fraction=0.5)
    for split, ids in w.split_people().items():
        ex = generate("world_qa", 40, seed=5, split=split, **params)  # world_seed defaults to seed
        assert {e.meta["person_id"] for e in ex} <= set(ids)
        for e in ex:
            person = w.people[e.meta["person_id"]]
            assert e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer:")
            assert person.name in e.prompt and e.answer == person.attribute(e.meta["attribute"])
    # Same world, different sampling seed: other draws, same facts.
    other = generate("world_qa", 40, seed=99, world_seed=5, split="qa_eval", **params)
    assert {e.meta["person_id"] for e in other} <= set(w.qa_eval_people)
    # No repeats until the pool is exhausted.
    ex = generate("world_qa", 100, seed=0, n_people=10, split="all")
    assert len({e.prompt for e in ex}) == 100


def test_world_qa_empty_split_is_an_error():
    with pytest.raises(ScalelabError, match="split 'unknown' has no people"):
        generate("world_qa", 5, n_people=10, split="unknown")
    with pytest.raises(ScalelabError, match="split must be one of"):
        generate("world_qa", 5, n_people=10, split="test")


def test_registry_errors_are_scalelab_errors():
    with pytest.raises(ScalelabError, match=r"unknown task generator 'nope' \(available: .*arithmetic"):
        generate("nope", 1)
    with pytest.raises(ScalelabError, match="unknown task generator"):
        get_generator("nope")
    with pytest.raises(ScalelabError, match="has no parameter 'digitz'"):
        generate("addition", 1, digitz=3)
    with pytest.raises(ScalelabError, match="parameter 'digits' must be int"):
        generate("addition", 1, digits="3")
    with pytest.raises(ScalelabError, match="number of examples"):
        generate("addition", -1)
    with pytest.raises(ScalelabError, match="ops must be made of"):
        generate("arithmetic", 1, ops="/")
    with pytest.raises(ScalelabError, match="min_digits <= max_digits"):
        generate("arithmetic", 1, min_digits=3, max_digits=2)


def test_a_new_generator_plugs_in(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @g.register("reverse")
    def reverse(n: int, rng: random.Random, *, length: int = 4) -> list[Example]:
        """Reverse a word. Prompt "Reverse abcd:", answer "dcba"."""
        words = ["".join(rng.choice("abcdef") for _ in range(length)) for _ in range(n)]
        return [Example("reverse", f"Reverse {w}:", w[::-1], {"length": length}) for w in words]

    assert "reverse" in available() and generator_params("reverse") == {"length": 4}
    ex = generate("reverse", 3, seed=0, length=6)
    assert all(e.answer == e.prompt[8:14][::-1] for e in ex)
    with pytest.raises(ValueError, match="registered twice"):
        g.register("reverse")(reverse)
    # A registered generator can be mixed into the world's pretraining text.
    docs = World(WorldConfig(n_people=3, extra_tasks={"reverse": 5})).pretraining_documents()
    assert any(d.startswith("Reverse ") for d in docs)
