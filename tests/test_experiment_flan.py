"""``scalelab experiments flan``: the design (held-out families, nested training sets), the scoring and
aggregation on hand-made inputs, bad designs, and a tiny end-to-end run."""

import json

import pytest

from posttrain_util import make_init_run, one_thread  # noqa: F401 (fixture)
from scalelab.cli import main
from scalelab.errors import ScalelabError
from scalelab.experiments.flan import (FlanConfig, aggregate, answer_options, check, family_draws, score_replies,
                                      verdict)


def _rec(task, answer, **meta):
    return {"task": task, "answer": answer, "messages": [], "meta": meta}


def test_score_replies_per_family_and_mean_of_families():
    recs = [_rec("a", "Paris"), _rec("a", "Rome"), _rec("b", "city"), _rec("a", "Oslo")]
    texts = [" paris ", "I think Rome.", "a company", "Oslo"]
    m = score_replies(recs, texts, ended=[True, False, True, True], nll=[1.0, 2.0, 4.0, 3.0],
                      ranked=[1.0, 0.0, 1.0, 1.0], chance=[0.5, 0.5, 0.25, 0.5])
    a, b = m["per_family"]["a"], m["per_family"]["b"]
    assert a["exact"] == pytest.approx(2 / 3) and a["contains"] == pytest.approx(1.0)
    assert a["ended"] == pytest.approx(2 / 3) and a["answer_nll"] == pytest.approx(2.0) and a["n"] == 3
    assert a["ranked"] == pytest.approx(2 / 3) and a["chance"] == pytest.approx(0.5)
    assert b == {"exact": 0.0, "contains": 0.0, "ended": 1.0, "answer_nll": 4.0, "ranked": 1.0, "chance": 0.25, "n": 1}
    # Families weigh the same whatever their counts, so a big family cannot hide a small one.
    assert m["exact"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["answer_nll"] == pytest.approx((2.0 + 4.0) / 2)


def test_score_replies_rejects_mismatched_inputs():
    with pytest.raises(ScalelabError):
        score_replies([_rec("a", "x")], ["x", "y"], [True], [1.0], [1.0], [0.5])
    with pytest.raises(ScalelabError):
        score_replies([_rec("a", "x")], ["x"], [True], [1.0], [], [0.5])
    with pytest.raises(ScalelabError):
        score_replies([], [], [], [], [], [])


def test_answer_options_gold_included_from_alternatives_yes_no_or_family_answers():
    recs = [_rec("comparison", "Ann Lee", kind="earlier", alternatives=["Bo Wu", "Ann Lee"]),
            _rec("comparison", "No", kind="yes_no"),
            _rec("classification", "city", kind="category"), _rec("classification", "company", kind="category"),
            _rec("classification", "city", kind="category")]
    opts = answer_options(recs)
    assert opts[0] == ["Bo Wu", "Ann Lee"] and opts[1] == ["Yes", "No"]
    assert opts[2] == opts[3] == opts[4] == ["city", "company"]
    assert all(r["answer"] in o for r, o in zip(recs, opts))


def test_aggregate_means_and_spread_per_k():
    def row(k, nll, ranked):
        return {"k": k, "exact": 0.0, "contains": 0.1, "ended": 1.0, "answer_nll": nll, "ranked": ranked, "chance": 0.4}
    out = aggregate([row(2, 3.0, 0.5), row(0, 6.0, 0.4), row(2, 2.0, 0.7), row(2, 1.0, 0.6)])
    assert [r["k"] for r in out] == [0, 2] and [r["runs"] for r in out] == [1, 3]
    assert out[1]["answer_nll"] == pytest.approx(2.0) and out[1]["answer_nll_std"] == pytest.approx(1.0)  # sample std
    assert out[1]["ranked"] == pytest.approx(0.6) and out[1]["ranked_std"] == pytest.approx(0.1)
    assert out[0]["answer_nll_std"] == 0.0 and out[0]["chance"] == pytest.approx(0.4)


def _table(nll, nll_std, ranked, ranked_std):
    return [{"k": k, "runs": 3, "answer_nll": n, "answer_nll_std": sn, "ranked": r, "ranked_std": sr}
            for k, n, sn, r, sr in zip([0, 1, 2, 4], nll, nll_std, ranked, ranked_std)]


def test_verdict_growth_and_diminishing_returns_against_seed_spread():
    # NLL gains 2, 3, 3.2 over the base (k = 1, 2, 4); ranked accuracy flat within noise.
    v = verdict(_table([10.0, 8.0, 7.0, 6.8], [0, 0.2, 0.2, 0.2], [0.5, 0.6, 0.62, 0.61], [0, 0.1, 0.1, 0.1]))
    nll, ranked = v["answer_nll"], v["ranked"]
    assert nll["gain"] == pytest.approx({"1": 2.0, "2": 3.0, "4": 3.2})
    assert nll["grows"] and nll["diminishing"] and not nll["still_rising"]
    assert nll["slope_first"] == pytest.approx(1.0) and nll["slope_last"] == pytest.approx(0.2)
    assert not ranked["grows"] and not ranked["diminishing"]
    # steady gains per doubling: growth without diminishing returns
    steady = verdict(_table([10.0, 8.0, 7.0, 6.0], [0, 0.1, 0.1, 0.1], [0.5, 0.6, 0.7, 0.8], [0, 0.01, 0.01, 0.01]))
    assert all(d["grows"] and not d["diminishing"] and d["still_rising"] for d in steady.values())
    # too few counts to judge a shape
    assert verdict(_table([10.0, 8.0, 7.0], [0, 0.1, 0.1], [0.5, 0.6, 0.7], [0, 0.1, 0.1])) == {}


def test_family_draws_are_nested_per_seed_and_deterministic():
    pool = ["p", "q", "r", "s", "t", "u"]
    draws = family_draws(pool, [0, 1, 2, 4, 6], seeds=3, seed=5)
    assert draws == family_draws(pool, [0, 1, 2, 4, 6], seeds=3, seed=5)
    assert len(draws) == 3 and all(sorted(d) == [1, 2, 4, 6] for d in draws)  # the base is not a draw
    for d in draws:
        assert all(len(d[k]) == k for k in d) and d[6] == tuple(sorted(pool))
        assert set(d[1]) <= set(d[2]) <= set(d[4])  # within a seed, more families add to fewer
    # seeds start from different families, so k = 1 covers three families
    assert len({d[1] for d in draws}) == 3


def test_bad_designs_are_refused():
    with pytest.raises(ScalelabError, match="unknown families"):
        check(FlanConfig(heldout=["nope"]))
    with pytest.raises(ScalelabError, match="at least one"):
        check(FlanConfig(heldout=[]))
    with pytest.raises(ScalelabError, match="counts"):
        check(FlanConfig(heldout=["classification", "comparison"], counts=[0, 7]))
    assert "classification" not in check(FlanConfig(heldout=["classification"]))


def test_tiny_flan_end_to_end(tmp_path, capsys):
    base = make_init_run(tmp_path / "base", block_size=256)
    out = tmp_path / "flan"
    cfg = tmp_path / "flan.toml"
    cfg.write_text(f'[run]\nprogress = false\n[flan]\nout_dir = "{out}"\nbase = "{base}"\n'
                   'heldout = ["classification"]\n'
                   "counts = [0, 1, 2, 4]\nseeds = 2\neval_per_family = 3\nmax_new_tokens = 4\n"
                   "[sft]\nn_examples = 40\nsteps = 2\nbatch_size = 4\neval_every = 2\n"
                   "[sft.optim]\nlr = 1e-3\nwarmup_steps = 10\n")
    assert main(["experiments", "flan", "-c", str(cfg)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["k"] for r in result["by_k"]] == [0, 1, 2, 4] and [r["runs"] for r in result["by_k"]] == [1, 2, 2, 2]
    assert result["heldout_prompts"] == 3
    for r in result["runs"]:
        assert "classification" not in r["families"] and len(r["families"]) == r["k"]
        assert 0 <= r["exact"] <= r["contains"] <= 1 and r["answer_nll"] > 0
        assert r["ranked"] in (0.0, 1 / 3, 2 / 3, 1.0) and 0 < r["chance"] <= 1
    # the two seeds of a k are different SFT runs (their own seed and family draw)
    assert len({r["run"] for r in result["runs"] if r["k"] == 1}) == 2
    assert set(result["verdict"]) == {"answer_nll", "ranked"}
    assert (out / "flan.png").stat().st_size > 0 and "| training families |" in (out / "results.md").read_text()
    assert "results:" in capsys.readouterr().out
    # a bad design is one line on stderr and exit code 2
    code = main(["experiments", "flan", "-c", str(cfg), "--set", 'flan.heldout=["bogus"]'])
    err = capsys.readouterr().err
    assert code == 2 and "bogus" in err and len(err.strip().splitlines()) == 1
