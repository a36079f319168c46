import json

import torch

from posttrain_util import make_init_run, one_thread  # noqa: F401 (fixture)
from scalelab.cli import main
from scalelab import checkpoint as ckpt
from scalelab.train.metrics import read_metrics


def _common(out):
    return ["--set", f'run.out_dir="{out}"', "--set", "run.progress=false", "--set", "eval.max_new_tokens=4"]


def test_sft_rm_ppo_dpo_chain_from_the_command_line(tmp_path, capsys):
    base = make_init_run(tmp_path / "base")
    sft, rm, ppo, dpo = (tmp_path / n for n in ("sft", "rm", "ppo", "dpo"))
    assert main(["sft", "--init", str(base), *_common(sft), "--set", "sft.steps=3", "--set", "sft.n_examples=40",
                 "--set", "sft.batch_size=4"]) == 0
    assert main(["rm", "--init", str(sft), *_common(rm), "--set", "rm.steps=3", "--set", "rm.n_pairs=40",
                 "--set", "rm.batch_size=4", "--set", 'rm.bias="longer"']) == 0
    assert main(["ppo", "--init", str(sft), "--reward-model", str(rm), *_common(ppo), "--set", "ppo.iterations=1",
                 "--set", "ppo.rollout_batch=2", "--set", "ppo.minibatch_size=2", "--set", "ppo.max_new_tokens=4",
                 "--set", "ppo.n_prompts=30", "--set", 'ppo.critic_init="reward_model"']) == 0
    assert main(["dpo", "--init", str(sft), *_common(dpo), "--set", "dpo.steps=2", "--set", "dpo.n_pairs=30",
                 "--set", "dpo.batch_size=4"]) == 0
    init_of = {sft: base, rm: sft, ppo: sft, dpo: sft}
    for run in (sft, rm, ppo, dpo):
        model, init = ckpt.load_model(run), ckpt.load_model(init_of[run])
        assert model.config == init.config, run.name
        moved = [n for n, p in init.state_dict().items() if not torch.equal(p, model.state_dict()[n])]
        assert moved, f"{run.name}: the saved weights are the ones it started from"
        assert read_metrics(run / "metrics.jsonl")
        assert json.loads((run / "stage.json").read_text())["stage"] == run.name
    assert "run folder" in capsys.readouterr().out


def test_bad_data_file_is_a_one_line_error(tmp_path, capsys):
    base = make_init_run(tmp_path / "base")
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    code = main(["dpo", "--init", str(base), *_common(tmp_path / "dpo"), "--set", 'dpo.data="jsonl"',
                 "--set", f'dpo.path="{bad}"'])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:1" in err and "'chosen' equals 'rejected'" in err and len(err.strip().splitlines()) == 1
    code = main(["sft", "--init", str(tmp_path / "nope"), *_common(tmp_path / "sft")])
    assert code == 2 and "not a run folder" in capsys.readouterr().err
