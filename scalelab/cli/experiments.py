"""``scalelab experiments <name>``: end-to-end studies, each a module in this package.

Each study registers one action name here; the handler imports its module lazily so
building the CLI parser stays cheap. A study's own knobs live in its own TOML section
(``[abstain]``, ...) and dataclass, split off by ``load_config_with_section`` so the shared
``Config`` tree in scalelab/config.py does not grow a section per study.
"""

from __future__ import annotations

ACTIONS: dict[str, tuple[str, str]] = {
    # name: (module holding the study's STUDY, help)
    "abstain": ("scalelab.experiments.abstain",
                "abstention: known vs unknown people, SFT with/without 'I don't know', RL with an abstain reward"),
    "abstain-worlds": ("scalelab.experiments.abstain_worlds",
                       "the abstention study across world seeds: mean ± std, and the headline's target per world (--runs)"),
    "distill": ("scalelab.experiments.distill",
                "distillation copies the teacher's knowledge gaps (4 groups of people); RL with the abstain reward repairs"),
    "flan": ("scalelab.experiments.flan",
             "instruction tuning on 1, 2, 4, ... task families, scored on held-out families"),
    "reward-hacking": ("scalelab.experiments.reward_hacking",
                       "PPO against a length-biased reward model with/without KL; SFT vs PPO vs DPO by gold win rate"),
    "reward-overopt": ("scalelab.experiments.overoptimization",
                       "best-of-n and PPO against a proxy RM fit to few gold labels: gold and proxy vs sqrt(KL)"),
    "reasoning": ("scalelab.experiments.reasoning",
                  "chain-of-thought warm start, GRPO with verifiable rewards, test-time compute curves, tool use"),
    "icl": ("scalelab.experiments.icl", "accuracy against shot count (0, 1, few) for several model sizes"),
    "adaptation": ("scalelab.experiments.adaptation",
                   "embeddings: zero-shot cosine vs linear probe; task heads; full / last-k / frozen / LoRA fine-tuning"),
    "emergence": ("scalelab.experiments.emergence",
                  "exact match next to continuous metrics over a scaling sweep's runs (scaling.out_dir)"),
    "emergence-addition": ("scalelab.experiments.emergence_addition",
                           "a family trained from scratch on reversed addition: exact match vs continuous metrics"),
    "families": ("scalelab.experiments.families",
                 "decoder-only vs encoder-only (masked LM) vs prefix-LM at equal training FLOPs"),
}


def register(sub, add_config_args) -> dict:
    p = sub.add_parser("experiments", help="end-to-end studies: " + ", ".join(sorted(ACTIONS)))
    p.add_argument("action", choices=sorted(ACTIONS), help="; ".join(f"{k}: {v[1]}" for k, v in sorted(ACTIONS.items())))
    add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="delete the experiment's output folder first")
    p.add_argument("--n", type=int, default=100, help="emergence: examples per task and run")
    p.add_argument("--runs", nargs="+", help="abstain-worlds: finished abstention folders, one per world")
    p.add_argument("--out", help="abstain-worlds: output folder (default runs/abstain_worlds)")
    p.add_argument("--need", type=int, default=0, help="abstain-worlds: worlds that must meet the target (default 4 of 5)")
    return {"experiments": _run}


def _run(args) -> None:
    # deferred: a study imports torch and its stages; `scalelab --help` should not pay for them
    import importlib

    module = importlib.import_module(ACTIONS[args.action][0])
    if args.action in ("emergence", "abstain-worlds"):  # studies over finished runs: no stage of their own
        module.run_cli(args)
    else:
        module.STUDY.main(args.config, args.overrides, overwrite=args.overwrite)
