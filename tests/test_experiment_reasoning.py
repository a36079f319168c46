"""The reasoning study: thinking-budget truncation, majority vote and verifier best-of-N by hand, the
equal-compute accounting by hand, tool traces, and the whole study on a micro preset (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain_util import one_thread, tiny_model  # noqa: F401 (fixture)
from scalelab.cli import main
from scalelab.errors import ScalelabError
from scalelab.experiments import reasoning as rs
from scalelab.experiments import reasoning_tools as rt
from scalelab.experiments import reasoning_ttc as ttc
from scalelab.config import load_config_with_section
from scalelab.tasks import get_task
from scalelab.tokenizer import ByteTokenizer

# -- test-time compute --------------------------------------------------------------------------------------


def test_cut_thinking_by_hand():
    tok = ByteTokenizer()
    ids = tok.encode("3+4=7\nso 7\nAnswer: 7")

    def cut(budget, generated=ids):
        return tok.decode(ttc.cut_thinking(tok, generated, budget))

    assert cut(100) == "3+4=7\nso 7"  # the model's own answer line is dropped
    assert cut(6) == "3+4=7"  # cut at 6 tokens, the trailing newline dropped
    assert cut(3) == "3+4" and cut(0) == ""
    assert cut(4, [tok.token_id("<|tool_call_start|>")] + ids) == "3+4"  # special tokens never count as thinking
    assert ttc.cut_thinking(tok, list("é".encode()) * 3, 5) == list("é".encode()) * 2 + ["é".encode()[0]]
    with pytest.raises(ScalelabError, match="budget"):
        ttc.cut_thinking(tok, ids, -1)


def test_budget_truncation_forces_the_answer_suffix():
    tok = ByteTokenizer()
    problems = get_task("addition").generate(3, 0, 2)
    prompts = [rs.chat_prompt(tok, p) for p in problems]
    # Zero output weights: every logit ties, greedy decoding always writes byte 0 and never stops,
    # so the thinking fills the whole budget and the answer its whole allowance.
    flat = tiny_model(tok.vocab_size, 128)
    torch.nn.init.zeros_(flat.lm_head.weight)
    for budget in (0, 5, 12):
        for r in ttc.budget_replies(flat, tok, prompts, budget, answer_tokens=3):
            assert r["thinking_tokens"] == budget
            assert r["text"] == "\x00" * budget + "\nAnswer:" + "\x00" * 3
    # A random model: whatever it writes, the thinking stays within the budget and the suffix follows it.
    model = tiny_model(tok.vocab_size, 128, seed=3)
    for r in ttc.budget_replies(model, tok, prompts, 7, answer_tokens=4):
        assert r["thinking_tokens"] <= 7 and len(tok.encode(r["thinking"].replace("\ufffd", "?"))) <= 7
        assert r["text"].startswith(r["thinking"] + "\nAnswer:")
    curve = ttc.budget_curve(model, tok, problems, prompts, [0, 4], 4)
    assert curve["budget"] == [0, 4] and len(curve["accuracy"]) == 2 and curve["thinking_tokens"][0] == 0


def test_majority_vote_and_best_of_n_by_hand():
    assert ttc.majority_vote(["7", "8", "8"]) == "8"
    assert ttc.majority_vote(["12", None, "13", "12 ", "13"]) == "12"  # a 2-2 tie: the earlier answer wins
    assert ttc.majority_vote(["13", "12", "12", "13"]) == "13"
    assert ttc.majority_vote([None, "", None]) is None  # malformed samples never vote
    assert ttc.majority_vote([None, None, "5"]) == "5"
    assert ttc.best_of_n([False, True, True]) == 1
    assert ttc.best_of_n([False, False]) is None
    s = [{"answer": "5", "correct": True}, {"answer": "6", "correct": False}, {"answer": "6", "correct": False},
         {"answer": None, "correct": False}]
    assert ttc.block_scores(s, 1) == (0.25, 0.25)
    assert ttc.block_scores(s, 2) == (0.5, 0.5)  # blocks [5, 6] (tie -> 5, right) and [6, None]
    assert ttc.block_scores(s, 4) == (0.0, 1.0)  # the vote says 6; the verifier finds the 5
    curves = ttc.sample_curves([s, [{"answer": "1", "correct": True}] * 4], [1, 2, 4])
    assert curves == {"n": [1, 2, 4], "majority": [0.625, 0.75, 0.5], "best_of_n": [0.625, 0.75, 1.0]}
    with pytest.raises(ScalelabError, match="N = 5"):
        ttc.block_scores(s, 5)


# -- equal compute ------------------------------------------------------------------------------------------


def test_equal_compute_accounting_by_hand():
    fpt = lambda t: 10 + t  # noqa: E731 (per-token cost growing with the length, like attention)
    assert rs.batch_flops(4, 11, fpt) == 4 * 10 * 20
    lengths = {"cot": {"a": [5, 5], "b": [9, 9]}, "answer_only": {"a": [3, 3], "b": [3, 3]}}
    plans = rs.equal_compute_plans(lengths, 2, 2, seed=0, flops_per_token=fpt)
    # CoT: one batch of each task per epoch: 2 rows x 4 inputs x 14 + 2 x 8 x 18 = 112 + 288
    assert plans["cot"]["steps"] == 2 and plans["cot"]["flops"] == 400
    assert plans["cot"]["tokens"] == 28 and plans["cot"]["padded_tokens"] == 28
    # answer-only: 2 x 2 x 12 = 48 per batch; 8 batches are 384 < 400, 9 are 432
    assert plans["answer_only"]["steps"] == 9 and plans["answer_only"]["flops"] == 432
    assert sorted(map(sorted, plans["cot"]["batches"])) == [[0, 1], [2, 3]]  # one task per batch
    # uneven lengths inside a batch are padded to the longest row
    p = rs.plan({"a": [4, 6]}, 2, 0, fpt, steps=1)
    assert p["flops"] == 2 * 5 * 15 and p["tokens"] == 10 and p["padded_tokens"] == 12
    with pytest.raises(ScalelabError, match="exactly one"):
        rs.plan({"a": [4]}, 2, 0, fpt)


# -- tool traces --------------------------------------------------------------------------------------------


def test_tool_traces_call_the_calculator_and_mask_its_output():
    tok = ByteTokenizer()
    for name in ("addition", "multiplication", "expression"):
        for p in get_task(name).generate(5, 1, 2):
            expr = rt.problem_expression(p)
            assert expr is not None and expr in p.prompt
    p = get_task("multiplication").generate(1, 0, 2)[0]
    prompt = rs.chat_prompt(tok, p)
    ids, mask = rt.tool_row(tok, prompt, rt.problem_expression(p), p.answer)
    out_start, out_end = ids.index(tok.token_id("<|tool_output_start|>")), ids.index(tok.token_id("<|tool_output_end|>"))
    assert tok.decode(ids[out_start + 1 : out_end]) == p.answer
    assert set(mask[out_start : out_end + 1]) == {0} and mask[out_start - 1] == 1 and mask[out_end + 1] == 1
    assert sum(mask[: len(prompt)]) == 0 and tok.decode(ids[len(prompt):]).endswith(f"Answer: {p.answer}<|assistant_end|>")


# -- the study ----------------------------------------------------------------------------------------------

MICRO = [
    "model.depth=1", "model.n_embd=32", "model.head_dim=16", "model.block_size=256", "tokenizer.kind=byte",
    "run.seed=3", "train.log_every=1",
    'reasoning.tasks=["addition", "sudoku"]', "reasoning.difficulties={addition = [1, 2], sudoku = [4]}",
    "reasoning.train_per_difficulty=40", "reasoning.eval_per_difficulty=3",
    "sft.steps=3", "sft.batch_size=8", "sft.optim.lr=1e-3", "sft.optim.warmup_steps=20",
    "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.eval_every=1", "grpo.eval_problems=3",
    "grpo.optim.lr=5e-5", "grpo.temperature=0.8", 'grpo.old_logprobs="recompute"',
    "reasoning.ttc_problems=2", "reasoning.ttc_samples=4",
    "reasoning.sample_counts=[1, 2, 4]", "reasoning.thinking_budgets=[0, 8]", 'reasoning.tool_tasks=["addition"]',
    "reasoning.tool_sft_steps=2", "reasoning.tool_eval_per_difficulty=2",
]


def test_micro_study_writes_every_section(tmp_path):
    out = tmp_path / "reasoning"
    cfg, r = load_config_with_section(None, MICRO + [f'reasoning.out_dir="{out}"'], "reasoning", rs.ReasoningConfig)
    result = rs.run_reasoning(cfg, r, log=lambda *_: None)
    saved = json.loads((out / "results.json").read_text())
    for key in ("compute", "warm_start", "rl", "ttc", "tools", "timings_seconds"):
        assert key in saved and saved[key], key
    c = saved["compute"]
    assert c["cot"]["steps"] == 3 and c["answer_only"]["steps"] > 3
    assert 1.0 <= c["flops_ratio_answer_only_to_cot"] < 1.5  # matched up to one answer-only batch
    for cond in rs.CONDITIONS:
        assert set(saved["warm_start"][cond]["addition"]) == {"1", "2", "all"}
        assert saved["warm_start"][cond]["sudoku"]["4"]["n"] == 3
    assert set(saved["rl"]) == {"addition", "sudoku"}
    assert saved["rl"]["sudoku"]["eval_step"] == [0, 1, 2] and len(saved["rl"]["sudoku"]["pass@1"]) == 2
    assert saved["ttc"]["addition"]["samples"]["n"] == [1, 2, 4] and saved["ttc"]["sudoku"]["budget"]["budget"] == [0, 8]
    assert set(saved["tools"]["addition"]["2"]) >= {"answer_only", "cot", "tool", "tool_disabled"}
    for png in ("warm_start", "rl", "ttc_budget", "ttc_samples", "tools"):
        assert (out / f"{png}.png").stat().st_size > 1000, png
    assert "| sudoku | 4 |" in (out / "summary.md").read_text()
    assert result["warm_start"]["cot"]["addition"]["1"] == saved["warm_start"]["cot"]["addition"]["1"]
    with pytest.raises(ScalelabError, match="--overwrite"):
        rs.run_reasoning(cfg, r, log=lambda *_: None)


def test_bad_config_fails_with_the_key(tmp_path, capsys):
    def err(*sets):
        rc = main(["experiments", "reasoning", *[x for s in MICRO + list(sets) for x in ("--set", s)],
                   "--set", f'reasoning.out_dir="{tmp_path / "x"}"'])
        assert rc == 2
        return capsys.readouterr().err

    assert "unknown config key 'reasoning.nope'" in err("reasoning.nope=1")
    assert "unknown reasoning task 'chess'" in err('reasoning.tasks=["chess"]')
    assert "difficulties has no list for task 'sudoku'" in err("reasoning.difficulties={addition = [1]}")
    assert "difficulty" in err("reasoning.difficulties={addition = [9], sudoku = [4]}")
    assert "reasoning.rl_tasks names 'countdown'" in err('reasoning.rl_tasks=["countdown"]')
    assert "sample_counts" in err("reasoning.sample_counts=[32]")
    assert "tokenizer.kind" in err("tokenizer.kind=bpe")
    assert "grpo.eval_problems must be >= 1" in err("grpo.eval_problems=0")
    assert "grpo.reward_wrong must be below" in err("grpo.reward_wrong=2.0")
    with pytest.raises(ScalelabError, match="unknown config key"):
        load_config_with_section(None, ["reasoning.sft_stpes=3"], "reasoning", rs.ReasoningConfig)


def test_old_study_keys_load_into_the_stages_with_a_warning():
    old = ["reasoning.sft_steps=3", "reasoning.sft_lr=2e-3", "reasoning.rl_lr=1e-4", "reasoning.temperature=0.7",
           "reasoning.group_size=4", "reasoning.rl_eval_problems=5"]
    with pytest.warns(FutureWarning, match="reasoning.sft_lr -> sft.optim.lr"):
        cfg, r = rs.STUDY.load(None, old)
    assert (cfg.sft.steps, cfg.sft.optim.lr, cfg.grpo.optim.lr) == (3, 2e-3, 1e-4)
    assert (cfg.grpo.temperature, cfg.grpo.group_size, cfg.grpo.eval_problems) == (0.7, 4, 5)
    assert cfg.sft.optim.warmup_steps == 20 and cfg.grpo.optim.schedule == "constant"  # the rest as the stages say
    with pytest.warns(FutureWarning, match=r"reasoning.sft_lr \(ignored: sft.optim.lr is set\)"):
        cfg, _ = rs.STUDY.load(None, ["sft.optim.lr=3e-3", "reasoning.sft_lr=2e-3"])
    assert cfg.sft.optim.lr == 3e-3  # the stage's own key wins

