import json
import re

import pytest

from scalelab.data.world import (
    ATTRIBUTES, QUESTION_TEMPLATES, SENTENCE_TEMPLATES, Person, World, WorldConfig, render_qa,
)
from scalelab.errors import ScalelabError


def _sentences(text: str) -> list[str]:
    # A period after a capital letter is a middle initial, not a sentence end.
    return re.split(r"(?<=[a-z0-9])\. ", text)


def test_world_is_deterministic_from_its_seed():
    a, b = World(WorldConfig(seed=3, n_people=50)), World.generate(WorldConfig(seed=3, n_people=50))
    assert a.pretraining_documents() == b.pretraining_documents()
    assert a.to_dict() == b.to_dict() and a.eval_qa() == b.eval_qa()
    c = World(WorldConfig(seed=4, n_people=50))
    assert c.pretraining_documents() != a.pretraining_documents()
    assert [p.name for p in c.people] != [p.name for p in a.people]


def test_people_have_unique_names_and_every_attribute():
    w = World(WorldConfig(n_people=2000))
    assert len({p.name for p in w.people}) == 2000
    assert [p.id for p in w.people] == list(range(2000))
    p = w.people[0]
    assert re.fullmatch(r"[A-Z][a-z]+ [A-Z]\. [A-Z][a-z]+", p.name)
    assert re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", p.birth_date)
    assert all(p.attribute(a) for a in ATTRIBUTES)
    with pytest.raises(ScalelabError, match="unknown person attribute 'age'"):
        p.attribute("age")


def test_every_attribute_has_paraphrases_and_questions():
    assert set(SENTENCE_TEMPLATES) == set(QUESTION_TEMPLATES) == set(ATTRIBUTES)
    for a in ATTRIBUTES:
        assert len(set(SENTENCE_TEMPLATES[a])) >= 4 and len(set(QUESTION_TEMPLATES[a])) >= 2
        assert all("{value}" in t for t in SENTENCE_TEMPLATES[a])
        assert all("{name}" in q and q.endswith("?") for q in QUESTION_TEMPLATES[a])


def test_biographies_state_every_fact_in_varied_wording():
    w = World(WorldConfig(n_people=5, bios_per_person=6))
    bios = w.biographies()
    assert len(bios) == 30 and len(set(bios)) == 30  # six different renderings per person
    first = w.people[0]
    for bio in bios[:6]:
        assert first.name in _sentences(bio)[0]  # introduced by name in the first sentence
        assert all(first.attribute(a) in bio for a in ATTRIBUTES)
        assert len(_sentences(bio)) == len(ATTRIBUTES)
    # Sentence order is shuffled: the opening sentence is not always about the same attribute.
    openers = {_sentences(b)[0] for b in World(WorldConfig(n_people=1, bios_per_person=20)).biographies()}
    assert len(openers) > 3


def test_unknown_and_held_out_people_never_leak_into_pretraining():
    w = World(WorldConfig(n_people=60, unknown_fraction=0.25, qa_in_pretrain_fraction=0.5))
    split = w.split_people()
    assert len(split["unknown"]) == 15 and len(split["qa_train"]) + len(split["qa_eval"]) == 45
    assert not set(split["unknown"]) & (set(split["qa_train"]) | set(split["qa_eval"]))
    docs = w.pretraining_documents()
    text = "\n".join(docs)
    assert len(w.biographies()) == 45 * w.cfg.bios_per_person
    for i in split["unknown"]:
        assert not w.people[i].known and w.people[i].name not in text
    assert {q.person_id for q in w.unknown_qa()} == set(split["unknown"])
    eval_qa = w.eval_qa()
    assert {q.person_id for q in eval_qa} == set(split["qa_eval"]) 
    assert len(eval_qa) == len(split["qa_eval"]) * len(ATTRIBUTES)
    for q in w.qa_pairs(split["qa_eval"]):
        assert q.question not in text
        assert w.people[q.person_id].name in text  # but their biographies are there
    for q in w.qa_pairs(split["qa_train"]):
        assert render_qa(q.question, q.answer) in text


def test_pretraining_mixes_bios_qa_and_task_worksheets():
    w = World(WorldConfig(n_people=20, extra_tasks={"arithmetic": 45, "addition": 5}))
    docs = w.pretraining_documents()
    worksheets = [d for d in docs if re.match(r"What is \d", d)]
    assert len(worksheets) == 3 + 1  # arithmetic in sheets of 20, 20, 5; one addition sheet
    assert sum(d.count("\n") + 1 for d in worksheets) == 50
    qa_docs = [d for d in docs if d.startswith("Question: ")]
    assert len(qa_docs) == len(w.qa_train_people) == 10
    assert len(docs) == 20 * w.cfg.bios_per_person + 10 + 4
    assert docs != sorted(docs)  # shuffled, not grouped by kind
    assert all(not re.search(r"What is \d", d) for d in World(WorldConfig(n_people=20, extra_tasks={})).pretraining_documents())


def test_default_world_is_fast_to_build_and_sized_like_a_small_corpus():
    docs = World(WorldConfig()).pretraining_documents()
    size = sum(len(d) for d in docs)
    assert 500_000 < size < 3_000_000


def test_render_qa_prompt_is_completed_by_a_space_and_the_answer():
    assert render_qa("Q?", "A") == "Question: Q?\nAnswer: A"
    assert render_qa("Q?") + " A" == render_qa("Q?", "A")
    pair = World(WorldConfig(n_people=3)).qa_pairs([1])[0]
    assert pair.prompt == render_qa(pair.question) and pair.person_id == 1


def test_save_and_load_round_trip(tmp_path):
    w = World(WorldConfig(seed=9, n_people=20, unknown_fraction=0.1, extra_tasks={"addition": 3}))
    w.save(tmp_path / "w.json")
    back = World.load(tmp_path / "w.json")
    assert back.to_dict() == w.to_dict() and back.pretraining_documents() == w.pretraining_documents()
    assert World.from_dict(json.loads((tmp_path / "w.json").read_text())).cfg == w.cfg
    assert isinstance(back.people[0], Person)


def test_load_rejects_bad_records(tmp_path):
    with pytest.raises(ScalelabError, match="not found"):
        World.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ScalelabError, match="not a JSON world record"):
        World.load(tmp_path / "junk.json")
    with pytest.raises(ScalelabError, match="unknown world config key 'colour'"):
        World.from_dict({"config": {"colour": 1}})
    record = World(WorldConfig(n_people=4)).to_dict()
    record["people"][0]["major"] = "alchemy"
    with pytest.raises(ScalelabError, match="different world generator version"):
        World.from_dict(record)


@pytest.mark.parametrize("cfg, match", [
    (WorldConfig(n_people=0), "n_people"),
    (WorldConfig(bios_per_person=0), "bios_per_person"),
    (WorldConfig(unknown_fraction=1.0), "unknown_fraction"),
    (WorldConfig(qa_in_pretrain_fraction=1.5), "qa_in_pretrain_fraction"),
    (WorldConfig(extra_tasks={"nope": 3}), "unknown task generator 'nope'"),
    (WorldConfig(extra_tasks={"arithmetic": -1}), "extra_tasks.arithmetic"),
    (WorldConfig(extra_tasks={"world_qa": 10}), "cannot hold 'world_qa'"),
])
def test_bad_world_config_is_a_clear_error(cfg, match):
    with pytest.raises(ScalelabError, match=match):
        World(cfg)
