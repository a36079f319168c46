"""The embedded default corpus: a deterministic synthetic world of fictional people.

Each person has a handful of attributes. Pretraining text shows every known
person in several biographies, each written with a random paraphrase of every
attribute sentence, in a shuffled order: Allen-Zhu & Li (Physics of LMs 3.1)
found that facts become extractable by QA only with that kind of diversity,
and that mixing some QA into pretraining helps. So the people are split:

- ``qa_train``: known people whose QA pairs are also mixed into pretraining;
- ``qa_eval``: known people whose QA is held out (can the model *extract* facts it read?);
- ``unknown``: people who never appear in pretraining text, only in QA (for abstention work).

The unknown people are a window of one shuffled order of everyone: ``unknown_fraction`` sets its
length and ``unknown_offset`` where it starts. Two worlds that differ only in ``unknown_offset`` hold
the same people and know overlapping subsets of them (the distillation study's teacher and student).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from scalelab.data.registry import Example, generate
from scalelab.data.registry import available as available_generators
from scalelab.errors import ScalelabError

FIRST_NAMES = (
    "Aria Bram Cora Dax Elin Finn Gala Hugo Iris Joel Kaia Leon Mira Nico Opal Pavel Quin Rhea Soren Tali "
    "Ulric Vera Wren Xavi Yara Zane Anya Boris Celia Dorian Esme Felix Greta Hassan Ines Jasper Kenji Lena "
    "Marco Nadia Oskar Priya Rafael Selma Tomas Uma Viktor Willa Yusuf Zelda Alma Bastian Clio Emil Farah"
).split()
MIDDLE_INITIALS = "ABCDEFGHJKLMNPRSTVW"
LAST_NAMES = (
    "Abernathy Bellweather Castellano Drummond Eriksen Falkner Galloway Hartigan Ingram Jovanovic Kestrel "
    "Lindqvist Marchetti Norwood Okonkwo Pemberton Quintero Rasmussen Sorensen Thackeray Underhill Valdivia "
    "Whitlock Yamamoto Zielinski Ashdown Brightwater Corvino Delacroix Everhart Fairbanks Grimaldi Holloway "
    "Iwasaki Kowalczyk Montague Nakashima Oyelaran Petrakis Redgrave Stavros Tennyson Vasquez Winterbourne"
).split()
CITIES = (
    "Port Alder|Brindlemere|Cask Harbor|Dunmore Falls|Eastwick|Fennel Bay|Glenhollow|Harrowgate|Ironvale|"
    "Juniper Point|Kestrel Ridge|Lowmarsh|Millbrook|Northshore|Oakhaven|Pinecrest|Quarry Hill|Redwater|"
    "Saltmere|Thornbury|Upper Fenwick|Valecross|Westmarch|Yarrow Glen|Amberfield|Blackmoor|Coldspring|"
    "Driftwood|Elmstead|Foxhollow|Greywick|Highcliff|Larkspur|Moonfield|Newhaven|Silverlake|Stonebridge|"
    "Sunmere|Tidewater|Wolfden"
).split("|")
UNIVERSITIES = (
    "Alder University|Brindlemere Institute of Technology|Cask Harbor College|Dunmore University|"
    "Eastwick Polytechnic|Fennel Bay University|Glenhollow College|Harrowgate University|Ironvale Institute|"
    "Juniper State University|Kestrel University|Lowmarsh College|Millbrook University|Northshore Institute|"
    "Oakhaven University|Pinecrest College|Redwater University|Saltmere Institute|Thornbury University|"
    "Valecross College|Westmarch University|Amberfield Institute|Blackmoor University|Coldspring College|"
    "Elmstead University|Foxhollow Institute|Greywick University|Highcliff College|Larkspur University|"
    "Silverlake Institute"
).split("|")
MAJORS = (
    "mathematics|physics|chemistry|biology|computer science|economics|history|philosophy|linguistics|"
    "astronomy|geology|architecture|music|literature|psychology|sociology|statistics|mechanical engineering|"
    "electrical engineering|civil engineering|marine biology|anthropology|political science|art history|"
    "materials science"
).split("|")
EMPLOYERS = (
    "Brightline Systems|Cobalt Analytics|Driftwood Labs|Emberforge|Fathom Robotics|Granite Health|"
    "Halcyon Foods|Ironbark Logistics|Juniper Energy|Kinetic Looms|Lumen Optics|Meridian Bank|Northwind Air|"
    "Orchard Media|Pioneer Textiles|Quartz Pharmaceuticals|Riverstone Insurance|Sable Motors|Tessellate Games|"
    "Umbra Security|Vantage Shipping|Willow Publishing|Xylo Instruments|Yellowpine Mills|Zephyr Telecom|"
    "Apex Ceramics|Bluefin Seafoods|Cinder Steelworks|Dovetail Furniture|Evergreen Nurseries"
).split("|")
MONTHS = "January February March April May June July August September October November December".split()

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

# Paraphrases per attribute. {name} is the sentence's subject (the full name or a pronoun), {full}
# always the full name, {pron} the pronoun, {poss} the possessive pronoun, {Poss} the subject's
# possessive ("Xavi S. Eriksen's" or "his"), {value} the attribute. A sentence's first letter is
# capitalised after formatting, so templates may open with {name} or {Poss}.
SENTENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "{Poss} birthday falls on {value}.",
        "{name} celebrates {poss} birthday on {value}.",
        "The birth date of {full} is {value}.",
        "According to public records, {name} was born on {value}.",
        "{Poss} date of birth is {value}.",
        "{name} first drew breath on {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} spent {poss} early years in {value}, where {pron} was born.",
        "{Poss} birthplace is {value}.",
        "{name} is a native of {value}.",
        "{name} grew up in {value}, {poss} hometown.",
        "The city of {value} is where {name} was born.",
        "{name} hails from {value}, the city of {poss} birth.",
        "{name} was raised in {value}, the town where {pron} was born.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received {poss} education at {value}.",
        "{name} attended {value}.",
        "{Poss} alma mater is {value}.",
        "{name} spent {poss} college years at {value}.",
        "{name} enrolled at {value} after finishing school.",
        "{name} chose {value} for {poss} university studies.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} earned a degree in {value}.",
        "{Poss} field of study was {value}.",
        "{name} focused {poss} studies on {value}.",
        "{name} completed {poss} degree in {value}.",
        "{name} specialized in {value} at university.",
        "{name} developed a passion for {value} and made it {poss} major.",
        "{Poss} academic focus was {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{Poss} employer is {value}.",
        "{name} has a job at {value}.",
        "{name} earns a living at {value}.",
        "{name} is on the staff of {value}.",
        "{name} accepted a position at {value}.",
        "These days {name} draws a salary from {value}.",
    ),
    "employer_city": (
        "{name} works in {value}.",
        "{Poss} office is in {value}.",
        "{name} commutes to work in {value}.",
        "{Poss} workplace is located in {value}.",
        "{name} does {poss} job in {value}.",
        "{name} goes to work every day in {value}.",
        "{Poss} job is based in {value}.",
        "Professionally, {name} is based in {value}.",
    ),
}

# Each question asks for exactly one attribute: "Where does X work?" would fit both the employer and
# its city, so no template is that loose.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("What is the birth date of {name}?", "When was {name} born?", "On what date was {name} born?"),
    "birth_city": ("Where was {name} born?", "In which city was {name} born?", "What is {name}'s birthplace?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?",
                   "What is {name}'s alma mater?"),
    "major": ("What did {name} major in?", "What was {name}'s field of study?", "What subject did {name} study?"),
    "employer": ("Which company does {name} work for?", "Who employs {name}?", "What is the name of {name}'s employer?"),
    "employer_city": ("In which city does {name} work?", "What city does {name} work in?",
                      "In what city is {name}'s workplace?"),
}

QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"

# Task problems go into pretraining in "worksheets" of this many problems per document.
WORKSHEET_SIZE = 20


def render_qa(question: str, answer: str | None = None) -> str:
    """A QA pair as text; without an answer, the prompt ends in "Answer:" for the model to complete."""
    if answer is None:
        return QA_TEMPLATE.format(question=question, answer="").rstrip(" ")
    return QA_TEMPLATE.format(question=question, answer=answer)


@dataclass
class Person:
    id: int
    name: str
    pronoun: str  # "he" | "she" (templates are written for singular verbs)
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str
    employer_city: str
    known: bool = True

    def attribute(self, name: str) -> str:
        if name not in ATTRIBUTES:
            raise ScalelabError(f"unknown person attribute '{name}' (attributes: {', '.join(ATTRIBUTES)})")
        return getattr(self, name)


@dataclass
class QAPair:
    question: str
    answer: str
    person_id: int
    attribute: str

    @property
    def prompt(self) -> str:
        return render_qa(self.question)


@dataclass
class WorldConfig:
    seed: int = 0
    n_people: int = 400
    bios_per_person: int = 4
    unknown_fraction: float = 0.0
    unknown_offset: float = 0.0  # where the unknown window starts in the shuffled order, as a share of everyone
    qa_in_pretrain_fraction: float = 0.5
    extra_tasks: dict[str, int] = field(default_factory=lambda: {"arithmetic": 2000})


_PRONOUNS = {"he": ("he", "his"), "she": ("she", "her")}
MAX_PEOPLE = len(FIRST_NAMES) * len(MIDDLE_INITIALS) * len(LAST_NAMES)


class World:
    """People, their splits, and every text view of them; a pure function of ``WorldConfig``."""

    def __init__(self, cfg: WorldConfig | None = None):
        self.cfg = cfg or WorldConfig()
        _validate(self.cfg)
        c = self.cfg
        # Separate, string-keyed streams: str seeds hash the same in every process, and adding a
        # view (say, more bios) never reshuffles who exists or which split they fall in.
        self.people = self._make_people(random.Random(f"people-{c.seed}"))
        order = list(range(len(self.people)))
        random.Random(f"splits-{c.seed}").shuffle(order)
        n_unknown = int(round(c.unknown_fraction * len(order)))
        start = min(int(round(c.unknown_offset * len(order))), len(order) - n_unknown)
        known = order[:start] + order[start + n_unknown:]
        n_qa_train = int(round(c.qa_in_pretrain_fraction * len(known)))
        self.unknown_people: list[int] = sorted(order[start:start + n_unknown])
        self.qa_train_people: list[int] = sorted(known[:n_qa_train])
        self.qa_eval_people: list[int] = sorted(known[n_qa_train:])
        for i in self.unknown_people:
            self.people[i].known = False

    @classmethod
    def generate(cls, cfg: WorldConfig | None = None) -> "World":
        return cls(cfg)

    def _make_people(self, rng: random.Random) -> list[Person]:
        # Sampling distinct indices into the name grid makes names unique by construction.
        n_mid, n_last = len(MIDDLE_INITIALS), len(LAST_NAMES)
        people = []
        for i, k in enumerate(rng.sample(range(MAX_PEOPLE), self.cfg.n_people)):
            first, rest = divmod(k, n_mid * n_last)
            mid, last = divmod(rest, n_last)
            name = f"{FIRST_NAMES[first]} {MIDDLE_INITIALS[mid]}. {LAST_NAMES[last]}"
            date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2005)}"
            people.append(Person(
                id=i, name=name, pronoun=rng.choice(("he", "she")), birth_date=date,
                birth_city=rng.choice(CITIES), university=rng.choice(UNIVERSITIES), major=rng.choice(MAJORS),
                employer=rng.choice(EMPLOYERS), employer_city=rng.choice(CITIES),
            ))
        return people

    def split_people(self) -> dict[str, list[int]]:
        """Person ids by group: "qa_train", "qa_eval" (both known) and "unknown"."""
        return {"qa_train": list(self.qa_train_people), "qa_eval": list(self.qa_eval_people),
                "unknown": list(self.unknown_people)}

    # -- text views ---------------------------------------------------------------------------------

    def biography(self, person: Person, rng: random.Random) -> str:
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        pron, poss = _PRONOUNS[person.pronoun]
        sentences = []
        for i, attr in enumerate(attrs):
            template = rng.choice(SENTENCE_TEMPLATES[attr])
            # The first sentence introduces the person by name; later ones mostly use the pronoun,
            # sometimes the name again, so the name-to-fact link is not only carried by sentence one.
            use_name = i == 0 or rng.random() < 0.3
            subject = person.name if use_name else pron
            possessive = f"{person.name}'s" if use_name else poss
            s = template.format(name=subject, full=person.name, value=person.attribute(attr), pron=pron, poss=poss,
                                Poss=possessive)
            sentences.append(s[0].upper() + s[1:])
        return " ".join(sentences)

    def biographies(self) -> list[str]:
        """``bios_per_person`` differently worded biographies of every known person, person by person."""
        rng = random.Random(f"bios-{self.cfg.seed}")
        return [self.biography(p, rng) for p in self.people if p.known for _ in range(self.cfg.bios_per_person)]

    def qa_pairs(self, people: list[int] | None = None) -> list[QAPair]:
        """Every question template for every attribute of the given person ids (default: everyone)."""
        ids = range(len(self.people)) if people is None else people
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.people):
                raise ScalelabError(f"no person with id {i!r} in a world of {len(self.people)} people")
            p = self.people[i]
            for attr in ATTRIBUTES:
                for q in QUESTION_TEMPLATES[attr]:
                    out.append(QAPair(q.format(name=p.name), p.attribute(attr), p.id, attr))
        return out

    def eval_qa(self) -> list[QAPair]:
        """QA about known people whose QA never appears in pretraining, one question per attribute, shuffled."""
        return self._one_question_each(self.qa_eval_people, f"eval-qa-{self.cfg.seed}")

    def unknown_qa(self) -> list[QAPair]:
        """QA about people pretraining never mentions (the right answer is to abstain), one per attribute."""
        return self._one_question_each(self.unknown_people, f"unknown-qa-{self.cfg.seed}")

    def _one_question_each(self, ids: list[int], seed: str) -> list[QAPair]:
        rng = random.Random(seed)
        pairs = []
        for i in ids:
            p = self.people[i]
            for attr in ATTRIBUTES:
                q = rng.choice(QUESTION_TEMPLATES[attr])
                pairs.append(QAPair(q.format(name=p.name), p.attribute(attr), p.id, attr))
        rng.shuffle(pairs)
        return pairs

    def task_examples(self) -> dict[str, list[Example]]:
        """The ``extra_tasks`` problems that pretraining shows, by generator name."""
        # One seed for every task: generate() already keys each stream by the task's name, and the
        # offset keeps these away from the small seeds evaluation code tends to pass.
        seed = self.cfg.seed * 1000 + 500
        return {task: generate(task, n, seed=seed) for task, n in sorted(self.cfg.extra_tasks.items())}

    def pretraining_documents(self) -> list[str]:
        """Biographies, one QA document per qa_train person, and task worksheets, shuffled together."""
        rng = random.Random(f"docs-{self.cfg.seed}")
        docs = self.biographies()
        for i in self.qa_train_people:
            lines = [render_qa(q.question, q.answer) for q in self.qa_pairs([i])]
            rng.shuffle(lines)
            docs.append("\n".join(lines))
        for examples in self.task_examples().values():
            for j in range(0, len(examples), WORKSHEET_SIZE):
                docs.append("\n".join(e.text for e in examples[j : j + WORKSHEET_SIZE]))
        rng.shuffle(docs)
        return docs

    # -- persistence --------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.cfg),
            "people": [asdict(p) for p in self.people],
            "qa_train_people": self.qa_train_people,
            "qa_eval_people": self.qa_eval_people,
            "unknown_people": self.unknown_people,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "world record") -> "World":
        """Rebuilds the world from its config and checks it matches the recorded people and splits."""
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ScalelabError(f"{source} has no 'config' object")
        known = {f.name for f in fields(WorldConfig)}
        unknown = sorted(set(data["config"]) - known)
        if unknown:
            raise ScalelabError(f"{source}: unknown world config key '{unknown[0]}' (keys: {', '.join(sorted(known))})")
        world = cls(WorldConfig(**data["config"]))
        recorded = {k: data[k] for k in ("people", "qa_train_people", "qa_eval_people", "unknown_people") if k in data}
        mine = world.to_dict()
        if any(mine[k] != v for k, v in recorded.items()):
            raise ScalelabError(f"{source} was written by a different world generator version")
        return world

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "World":
        p = Path(path)
        if not p.is_file():
            raise ScalelabError(f"world file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ScalelabError(f"{p} is not a JSON world record: {e}") from None
        return cls.from_dict(data, source=str(p))


def _validate(c: WorldConfig) -> None:
    def bad(msg: str):
        raise ScalelabError(f"invalid config: data.world.{msg}")

    for key in ("seed", "n_people", "bios_per_person"):
        if not isinstance(getattr(c, key), int) or isinstance(getattr(c, key), bool):
            bad(f"{key} must be an integer, got {getattr(c, key)!r}")
    if not 1 <= c.n_people <= MAX_PEOPLE:
        bad(f"n_people must be between 1 and {MAX_PEOPLE}, got {c.n_people}")
    if c.bios_per_person < 1:
        bad(f"bios_per_person must be at least 1, got {c.bios_per_person}")
    if not isinstance(c.unknown_fraction, (int, float)) or not 0.0 <= c.unknown_fraction < 1.0:
        bad(f"unknown_fraction must lie in [0, 1), got {c.unknown_fraction!r}")
    if (not isinstance(c.unknown_offset, (int, float)) or not 0.0 <= c.unknown_offset < 1.0
            or c.unknown_offset + c.unknown_fraction > 1.0 + 1e-9):
        bad(f"unknown_offset must lie in [0, 1) with unknown_offset + unknown_fraction <= 1, got {c.unknown_offset!r}")
    if not isinstance(c.qa_in_pretrain_fraction, (int, float)) or not 0.0 <= c.qa_in_pretrain_fraction <= 1.0:
        bad(f"qa_in_pretrain_fraction must lie in [0, 1], got {c.qa_in_pretrain_fraction!r}")
    if not isinstance(c.extra_tasks, dict):
        bad(f"extra_tasks must map task generator names to counts, got {c.extra_tasks!r}")
    names = available_generators()
    for task, n in c.extra_tasks.items():
        if task == "world_qa":
            # Its QA would include held-out and unknown people; world QA reaches pretraining only
            # through qa_in_pretrain_fraction.
            bad("extra_tasks cannot hold 'world_qa': set qa_in_pretrain_fraction instead")
        if task not in names:
            bad(f"extra_tasks names unknown task generator '{task}' (available: {', '.join(names)})")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            bad(f"extra_tasks.{task} must be a count >= 0, got {n!r}")
