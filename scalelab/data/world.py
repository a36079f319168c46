"""The embedded default corpus: a deterministic synthetic world of fictional people.

Each person has a handful of attributes. Pretraining text shows every known
person in several biographies, each written with a random paraphrase of every
attribute sentence, in a shuffled order: Allen-Zhu & Li (Physics of LMs 3.1)
found that facts become extractable by QA only with that kind of diversity,
and that mixing some QA into pretraining helps. So the people are split:

- ``qa_train``: known people whose QA pairs are also mixed into pretraining;
- ``qa_eval``: known people whose QA is held out (can the model *extract* facts it read?);
- ``unknown``: people who never appear in pretraining text, only in QA (for abstention work).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

# Several paraphrases per attribute. {name} is the subject (full name or pronoun), {full} always the
# full name, {poss}/{Poss} the possessive, {value} the attribute.
SENTENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "{Poss} birthday is {value}.",
        "{name} celebrates {poss} birthday on {value}.",
        "The birth date of {full} is {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} spent {poss} early years in {value}, where {pron} was born.",
        "{Poss} birthplace is {value}.",
        "{name} is a native of {value}.",
        "{name} grew up in {value}, {poss} hometown.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received {poss} education at {value}.",
        "{name} attended {value}.",
        "{Poss} alma mater is {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} earned a degree in {value}.",
        "{Poss} field of study was {value}.",
        "{name} focused {poss} studies on {value}.",
        "{name} completed {poss} degree in {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{Poss} employer is {value}.",
        "{name} has a job at {value}.",
        "{name} earns a living at {value}.",
    ),
    "employer_city": (
        "{name} works in {value}.",
        "{Poss} office is in {value}.",
        "{name} commutes to work in {value}.",
        "{Poss} workplace is located in {value}.",
        "{name} does {poss} job in {value}.",
    ),
}

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("What is the birth date of {name}?", "When was {name} born?"),
    "birth_city": ("Where was {name} born?", "In which city was {name} born?"),
    "university": ("Which university did {name} attend?", "Where did {name} study?"),
    "major": ("What did {name} major in?", "What was {name}'s field of study?"),
    "employer": ("Which company does {name} work for?", "Who employs {name}?"),
    "employer_city": ("In which city does {name} work?", "Where does {name} work?"),
}

QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"


def render_qa(question: str, answer: str | None = None) -> str:
    """A QA pair as text; without an answer, the prompt ends in "Answer:" for the model to complete."""
    if answer is None:
        return f"Question: {question}\nAnswer:"
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
        return getattr(self, name)


@dataclass
class QAPair:
    question: str
    answer: str
    person_id: int
    attribute: str


@dataclass
class WorldConfig:
    seed: int = 0
    n_people: int = 400
    bios_per_person: int = 4
    unknown_fraction: float = 0.0
    qa_in_pretrain_fraction: float = 0.5
    extra_tasks: dict[str, int] = field(default_factory=lambda: {"arithmetic": 2000})


_PRONOUNS = {"he": ("he", "his"), "she": ("she", "her")}


class World:
    def __init__(self, cfg: WorldConfig | None = None):
        self.cfg = cfg or WorldConfig()
        c = self.cfg
        if c.n_people < 1:
            raise ScalelabError("invalid config: data.world.n_people must be at least 1")
        if c.bios_per_person < 1:
            raise ScalelabError("invalid config: data.world.bios_per_person must be at least 1")
        if not 0.0 <= c.unknown_fraction < 1.0 or not 0.0 <= c.qa_in_pretrain_fraction <= 1.0:
            raise ScalelabError("invalid config: data.world fractions must lie in [0, 1)")
        max_people = len(FIRST_NAMES) * len(MIDDLE_INITIALS) * len(LAST_NAMES)
        if c.n_people > max_people:
            raise ScalelabError(f"invalid config: data.world.n_people is at most {max_people}")
        rng = random.Random(f"world-{c.seed}")
        self.people = self._make_people(rng)
        order = list(range(len(self.people)))
        rng.shuffle(order)
        n_unknown = int(round(c.unknown_fraction * len(order)))
        unknown = set(order[:n_unknown])
        known = order[n_unknown:]
        n_qa_train = int(round(c.qa_in_pretrain_fraction * len(known)))
        self.qa_train_people = sorted(known[:n_qa_train])
        self.qa_eval_people = sorted(known[n_qa_train:])
        self.unknown_people = sorted(unknown)
        for i in unknown:
            self.people[i].known = False

    def _make_people(self, rng: random.Random) -> list[Person]:
        people, used = [], set()
        while len(people) < self.cfg.n_people:
            name = f"{rng.choice(FIRST_NAMES)} {rng.choice(MIDDLE_INITIALS)}. {rng.choice(LAST_NAMES)}"
            if name in used:
                continue
            used.add(name)
            date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2005)}"
            people.append(Person(
                id=len(people), name=name, pronoun=rng.choice(("he", "she")), birth_date=date,
                birth_city=rng.choice(CITIES), university=rng.choice(UNIVERSITIES), major=rng.choice(MAJORS),
                employer=rng.choice(EMPLOYERS), employer_city=rng.choice(CITIES),
            ))
        return people

    # -- text views ---------------------------------------------------------------------------------

    def biography(self, person: Person, rng: random.Random) -> str:
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        pron, poss = _PRONOUNS[person.pronoun]
        sentences = []
        for i, attr in enumerate(attrs):
            template = rng.choice(SENTENCE_TEMPLATES[attr])
            # The first sentence introduces the person by name; later ones mostly use the pronoun.
            use_name = i == 0 or rng.random() < 0.3
            subject = person.name if use_name else pron
            possessive = f"{person.name}'s" if use_name else poss
            s = template.format(name=subject, full=person.name, value=person.attribute(attr), pron=pron, poss=poss,
                                Poss=possessive)
            sentences.append(s[0].upper() + s[1:])
        return " ".join(sentences)

    def biographies(self) -> list[str]:
        rng = random.Random(f"bios-{self.cfg.seed}")
        return [self.biography(p, rng) for p in self.people if p.known for _ in range(self.cfg.bios_per_person)]

    def qa_pairs(self, people: list[int] | None = None) -> list[QAPair]:
        """Every question template for every attribute of the given people (default: all)."""
        ids = range(len(self.people)) if people is None else people
        out = []
        for i in ids:
            p = self.people[i]
            for attr in ATTRIBUTES:
                for q in QUESTION_TEMPLATES[attr]:
                    out.append(QAPair(q.format(name=p.name), p.attribute(attr), p.id, attr))
        return out

    def eval_qa(self) -> list[QAPair]:
        """QA about known people whose QA never appears in pretraining, one question per attribute."""
        rng = random.Random(f"eval-qa-{self.cfg.seed}")
        pairs = []
        for i in self.qa_eval_people:
            p = self.people[i]
            for attr in ATTRIBUTES:
                q = rng.choice(QUESTION_TEMPLATES[attr])
                pairs.append(QAPair(q.format(name=p.name), p.attribute(attr), p.id, attr))
        rng.shuffle(pairs)
        return pairs

    def pretraining_documents(self) -> list[str]:
        from scalelab.data.generators import generate

        rng = random.Random(f"docs-{self.cfg.seed}")
        docs = self.biographies()
        for i in self.qa_train_people:
            lines = [render_qa(q.question, q.answer) for q in self.qa_pairs([i])]
            rng.shuffle(lines)
            docs.append("\n".join(lines))
        for k, (task, n) in enumerate(sorted(self.cfg.extra_tasks.items())):
            examples = generate(task, n, seed=self.cfg.seed * 1000 + k) if n else []
            for j in range(0, len(examples), 20):  # 20 problems to a document, like a worksheet
                docs.append("\n".join(e.text for e in examples[j : j + 20]))
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

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "World":
        p = Path(path)
        if not p.is_file():
            raise ScalelabError(f"world file not found: {p}")
        data = json.loads(p.read_text(encoding="utf-8"))
        # The world is a pure function of its config; regenerate and check it matches the record.
        world = cls(WorldConfig(**data["config"]))
        if [asdict(x) for x in world.people] != data["people"]:
            raise ScalelabError(f"{p} was written by a different world generator version")
        return world
