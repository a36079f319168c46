"""The building blocks of a report card: runs, sections, tables, figures; rendered by card.py (Markdown) and html.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STAGE_TITLES = {
    "base": "Pretraining (base)", "sft": "SFT", "rm": "Reward model (RM)", "dpo": "DPO", "ppo": "PPO",
    "grpo": "GRPO / RL", "scaling": "Scaling sweep", "study": "Study",
}


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph, Markdown inline), Table, Figure, Code, Notes


@dataclass
class Code:
    text: str
    label: str  # shown as the <details> summary in HTML, a bold line in Markdown
    lang: str = ""


@dataclass
class Notes:
    """A Markdown file a study wrote, shown as it is."""

    text: str
    label: str


@dataclass
class RunInfo:
    path: Path
    name: str
    stage: str
    records: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    steps: float | None = None
    wall_seconds: float | None = None
    tokens: float | None = None
    flops: float | None = None
    flops_source: str = ""
    samples: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[Notes] = field(default_factory=list)
    table: Table | None = None
    config_text: str = ""
    recorded_machine: dict = field(default_factory=dict)


@dataclass
class Card:
    title: str
    sections: list[Section]
