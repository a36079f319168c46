"""What every study is: a config section, a run from the shared config to a result, a summary, and its files.

``scalelab experiments NAME --config FILE`` loads ``FILE`` once: the shared sections (``[data]``, ``[model]``,
``[train]``, ``[sft]``, ...) build the ``Config`` every stage takes, and ``[NAME]`` the study's own dataclass.
The study writes into its ``out_dir``; the CLI prints its summary and where its files are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from scalelab.config import Config, load_config_with_section


@dataclass(frozen=True)
class Study:
    name: str  # the CLI action and the config section
    config_class: type
    run: Callable[..., dict]  # run(cfg, study_cfg, overwrite=...) -> result
    summary: Callable[[dict], str]  # Markdown for the terminal
    outputs: tuple[str, ...]  # files in out_dir worth pointing at
    # old study keys that copied a stage's setting -> that setting ("sft_lr" -> "sft.optim.lr"), read with a
    # FutureWarning for one release
    moved_keys: dict[str, str | tuple[str, ...]] = field(default_factory=dict)

    def load(self, path, overrides) -> tuple[Config, Any]:
        return load_config_with_section(path, overrides, self.name, self.config_class, self.moved_keys)

    def main(self, path, overrides, overwrite: bool = False) -> dict:
        cfg, own = self.load(path, overrides)
        result = self.run(cfg, own, overwrite=overwrite)
        print(self.summary(result))
        out = Path(own.out_dir)
        print("results: " + ", ".join(str(out / name) for name in self.outputs))
        return result
