"""``scalelab sft | rm | ppo | dpo | grpo``: post-training stages, each starting from a finished run (--init)."""

from __future__ import annotations

STAGES = {
    "sft": "instruction tuning: loss on assistant tokens of chat data (built-in mixture, JSONL or HF)",
    "rm": "reward model: scalar head on a backbone, Bradley-Terry loss on preference pairs",
    "ppo": "PPO from an SFT run: KL to a frozen reference, critic with GAE, clipped surrogate",
    "dpo": "DPO from an SFT run on preference pairs, against a frozen reference",
    "grpo": "GRPO from an SFT run on a reasoning task: group-normalised advantages, verifiable rewards",
}


def register(sub, add_config_args) -> dict:
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        add_config_args(p)
        p.add_argument("--init", required=True, metavar="RUN_DIR",
                       help="the run to start from (pretraining for sft/rm, normally sft for ppo/dpo/grpo)")
        p.add_argument("--overwrite", action="store_true", help="delete run.out_dir's checkpoints first and start again")
        if name == "ppo":
            p.add_argument("--reward-model", metavar="RUN_DIR", help="an `scalelab rm` run (sets ppo.reward_model)")
    return {name: _run for name in STAGES}


def _run(args) -> None:
    from scalelab.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "reward_model", None):
        overrides.append(f"ppo.reward_model={_toml_string(args.reward_model)}")
    cfg = load_config(args.config, overrides)
    if args.command == "sft":
        from scalelab.posttrain.sft import run_sft as stage
    elif args.command == "rm":
        from scalelab.posttrain.reward_model import run_rm as stage
    elif args.command == "ppo":
        from scalelab.posttrain.ppo import run_ppo as stage
    elif args.command == "grpo":
        from scalelab.posttrain.grpo_stage import run_grpo as stage
    else:
        from scalelab.posttrain.dpo import run_dpo as stage
    summary = stage(cfg, args.init, overwrite=args.overwrite)
    for key, value in summary.items():
        if isinstance(value, float):
            print(f"{key}: {value:.4f}")
        elif key not in ("init",):
            print(f"{key}: {value}")
    print(f"run folder: {cfg.run.out_dir}")


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
