"""Labelled adaptation tasks built from the synthetic world: deterministic, embedded, no downloads.

- ``attribute``: which of a person's six attributes a single biography sentence states (6 classes);
- ``sentiment``: review-like sentences about the world's employers, cities and universities, positive
  or negative, a share of them negated ("was not friendly"), so a bag of words is not enough;
- ``name tags``: short biographies with every token of the person's name tagged (pronouns are not names);
- ``span QA``: a question, then a short biography; the answer is the attribute value's span in it;
- ``reading QA``: the same, as text to generate ("...\nAnswer: <value>").

Text is kept as segments (text, tag) so token labels come from encoding each segment on its own;
a space before a tagged segment is moved into it, which is exactly how the byte-level BPE (no
prefix space) cuts the whole string, so the tokens match the plain encoding of the sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from scalelab.data.world import ATTRIBUTES, CITIES, EMPLOYERS, QUESTION_TEMPLATES, SENTENCE_TEMPLATES, UNIVERSITIES
from scalelab.errors import ScalelabError

# Zero-shot label descriptions: plain sentences in the corpus's own words.
ATTRIBUTE_DESCRIPTIONS = {
    "birth_date": "This person was born on a date, a birthday in a month and year.",
    "birth_city": "This person was born in a city, the hometown of their birth.",
    "university": "This person studied at a university and graduated from college.",
    "major": "This person majored in a field of study and earned a degree in a subject.",
    "employer": "This person works for a company, an employer that pays a salary.",
    "employer_city": "This person works in a city where the office and workplace are located.",
}
SENTIMENT_LABELS = ("negative", "positive")
SENTIMENT_DESCRIPTIONS = {
    "negative": "It was bad, terrible and awful. I hated it.",
    "positive": "It was good, wonderful and excellent. I loved it.",
}
POSITIVE = ("wonderful", "excellent", "friendly", "delightful", "great", "pleasant", "superb", "charming")
NEGATIVE = ("terrible", "awful", "rude", "dreadful", "poor", "unpleasant", "miserable", "disappointing")
# {not} is "" or " not"; the other slots are world entities.
REVIEW_TEMPLATES = (
    "{name} said that working at {employer} was{not} {adj}.",
    "The staff at {employer} were{not} {adj}.",
    "My visit to {city} was{not} {adj}.",
    "The food in {city} is{not} {adj}.",
    "Classes at {university} were{not} {adj}.",
    "{name} thought the people of {city} were{not} {adj}.",
    "Honestly, the service from {employer} was{not} {adj}.",
    "The campus of {university} looked{not} {adj} to {name}.",
)
O, NAME, VALUE = 0, 1, 2  # segment tags
TAG_NAMES = ("other", "name")


@dataclass
class Segmented:
    """A text as (piece, tag) segments; ``text`` is their concatenation."""

    segments: list[tuple[str, int]]

    @property
    def text(self) -> str:
        return "".join(s for s, _ in self.segments)


def _capitalize(segments: list[tuple[str, int]]) -> list[tuple[str, int]]:
    first, tag = segments[0]
    return [(first[:1].upper() + first[1:], tag)] + segments[1:]


def _space_into_tagged(segments: list[tuple[str, int]]) -> list[tuple[str, int]]:
    merged: list[tuple[str, int]] = []  # neighbours with one tag become one piece, cut only where tags change
    for text, tag in segments:
        if merged and merged[-1][1] == tag:
            merged[-1] = (merged[-1][0] + text, tag)
        else:
            merged.append((text, tag))
    out = []
    for text, tag in merged:
        if tag != O and out and out[-1][1] == O and out[-1][0].endswith(" "):
            prev = out.pop()[0]
            if prev[:-1]:
                out.append((prev[:-1], O))
            text = " " + text
        if text:
            out.append((text, tag))
    return out


def attribute_sentence(person, attr: str, rng: random.Random, use_name: bool = True, value_tag: int = VALUE) -> list:
    """One biography sentence about ``attr`` as segments: the name tagged NAME, the value ``value_tag``."""
    template = rng.choice(SENTENCE_TEMPLATES[attr])
    pron, poss = ("he", "his") if person.pronoun == "he" else ("she", "her")
    # Placeholders become markers, then the string is cut at the markers into tagged pieces.
    marked = template.format(name="\x01" if use_name else pron, full="\x01", pron=pron, poss=poss,
                             Poss="\x01's" if use_name else poss, value="\x02")
    segments = []
    buf = ""
    for ch in marked:
        if ch in "\x01\x02":
            segments.append((buf, O))
            segments.append((person.name, NAME) if ch == "\x01" else (person.attribute(attr), value_tag))
            buf = ""
        else:
            buf += ch
    segments.append((buf, O))
    return _capitalize([s for s in segments if s[0]])


def short_bio(person, attrs: list[str], rng: random.Random, value_attr: str | None = None) -> list:
    """Sentences about ``attrs`` in order; the first names the person, later ones sometimes do.
    Only ``value_attr``'s value is tagged VALUE (the answer of a question about it)."""
    segments: list = []
    for i, attr in enumerate(attrs):
        if segments:
            segments.append((" ", O))
        s = attribute_sentence(person, attr, rng, use_name=i == 0 or rng.random() < 0.3,
                               value_tag=VALUE if attr == value_attr else O)
        segments.extend(s)
    return segments


def split_people(world, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) person ids, disjoint: a test example is always about someone training never showed."""
    ids = list(range(len(world.people)))
    random.Random(f"adapt-people-{seed}").shuffle(ids)
    n_test = max(1, round(test_fraction * len(ids)))
    if len(ids) - n_test < 1:
        raise ScalelabError(f"the world has {len(ids)} people; adaptation tasks need at least 2 (train and test)")
    return sorted(ids[n_test:]), sorted(ids[:n_test])


def attribute_examples(world, people: list[int], n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` single sentences naming a person, labelled by the attribute they state (index into ATTRIBUTES)."""
    rng = random.Random(f"adapt-attribute-{seed}")
    texts, labels = [], []
    for _ in range(n):
        person = world.people[rng.choice(people)]
        k = rng.randrange(len(ATTRIBUTES))
        texts.append(Segmented(attribute_sentence(person, ATTRIBUTES[k], rng)).text)
        labels.append(k)
    return texts, labels


def sentiment_examples(world, people: list[int], n: int, seed: int, negation: float = 0.3) -> tuple[list[str], list[int]]:
    """``n`` review sentences, label 1 = positive; a ``negation`` share say "not <adjective>" (label flipped)."""
    if not 0.0 <= negation <= 1.0:
        raise ScalelabError(f"invalid config: negation share must lie in [0, 1], got {negation}")
    rng = random.Random(f"adapt-sentiment-{seed}")
    texts, labels = [], []
    for _ in range(n):
        positive = rng.random() < 0.5
        negated = rng.random() < negation
        adj = rng.choice(POSITIVE if positive else NEGATIVE)
        s = rng.choice(REVIEW_TEMPLATES).format(
            name=world.people[rng.choice(people)].name, employer=rng.choice(EMPLOYERS), city=rng.choice(CITIES),
            university=rng.choice(UNIVERSITIES), adj=adj, **{"not": " not" if negated else ""})
        texts.append(s)
        labels.append(int(positive != negated))
    return texts, labels


def name_tag_examples(world, people: list[int], n: int, seed: int, n_sentences: int = 3) -> list[Segmented]:
    """Short biographies; tokens of the person's name are tag 1, all others 0."""
    rng = random.Random(f"adapt-tags-{seed}")
    out = []
    for _ in range(n):
        person = world.people[rng.choice(people)]
        attrs = rng.sample(ATTRIBUTES, min(n_sentences, len(ATTRIBUTES)))
        out.append(Segmented(_space_into_tagged(short_bio(person, attrs, rng))))
    return out


def qa_examples(world, people: list[int], n: int, seed: int, n_sentences: int = 3) -> list[dict]:
    """Reading-comprehension items: ``question``, ``context`` (segments, the answer tagged VALUE), ``answer``."""
    rng = random.Random(f"adapt-qa-{seed}")
    out = []
    for _ in range(n):
        person = world.people[rng.choice(people)]
        attrs = rng.sample(ATTRIBUTES, min(n_sentences, len(ATTRIBUTES)))
        asked = rng.choice(attrs)
        context = Segmented(_space_into_tagged(short_bio(person, attrs, rng, value_attr=asked)))
        question = rng.choice(QUESTION_TEMPLATES[asked]).format(name=person.name)
        out.append({"question": question, "context": context, "answer": person.attribute(asked), "attribute": asked})
    return out


# -- token views ------------------------------------------------------------------------------------------------


def encode_segments(tokenizer, segments: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """(token ids, per-token tag) from encoding each segment separately."""
    ids, tags = [], []
    for text, tag in segments:
        piece = tokenizer.encode(text)
        ids += piece
        tags += [tag] * len(piece)
    return ids, tags


def tagging_rows(tokenizer, examples: list[Segmented], block_size: int) -> list[tuple[list[int], list[int]]]:
    """(BOS + ids, labels) per example, cut to ``block_size``; the label of BOS is -1 (ignored)."""
    rows = []
    for ex in examples:
        ids, tags = encode_segments(tokenizer, ex.segments)
        rows.append((([tokenizer.bos_id] + ids)[:block_size], ([-1] + [int(t == NAME) for t in tags])[:block_size]))
    return rows


def span_rows(tokenizer, items: list[dict], block_size: int) -> list[dict]:
    """BOS + "Question: q\\nContext:" + context; the answer's first/last token indices and where the context starts.

    The question comes first because the model is causal: context tokens must see it to know what to point at.
    Items whose answer would be cut off by ``block_size`` are dropped.
    """
    rows = []
    for it in items:
        prefix = [tokenizer.bos_id] + tokenizer.encode(f"Question: {it['question']}\nContext:")
        ids, tags = encode_segments(tokenizer, [(" " + it["context"].segments[0][0], it["context"].segments[0][1])]
                                    + it["context"].segments[1:])
        ids = (prefix + ids)[:block_size]
        tags = ([O] * len(prefix) + tags)[:block_size]
        where = [i for i, t in enumerate(tags) if t == VALUE]
        if not where or where[-1] - where[0] + 1 != len(where):
            continue
        rows.append({"ids": ids, "context_start": len(prefix), "start": where[0], "end": where[-1],
                     "answer": it["answer"]})
    return rows


def reading_prompt(item: dict) -> str:
    return f"{item['context'].text}\nQuestion: {item['question']}\nAnswer:"
