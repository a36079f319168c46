"""``scalelab experiments flan``: the design (held-out families, nested training sets), the scoring and
aggregation on hand-made inputs, bad designs, and a tiny end-to-end run."""

import json

import pytest

from posttrain_util import make_init_run, one_thread  # noqa: F401 (fixture)
from scalelab.cli import main
from scalelab.errors import ScalelabError
from scalelab.experiments.flan import FlanConfig, aggregate, check, family_sets, score_replies


def _rec(task, answer):
    return {"task": task, "answer": answer, "messages": []}


def test_score_replies_per_family_and_mean_of_families():
    recs = [_rec("a", "Paris"), _rec("a", "Rome"), _rec("b", "city"), _rec("a", "Oslo")]
    texts = [" paris ", "I think Rome.", "a company", "Oslo"]
    m = score_replies(recs, texts, ended=[True, False, True, True], nll=[1.0, 2.0, 4.0, 3.0])
    a, b = m["per_family"]["a"], m["per_family"]["b"]
    assert a["exact"] == pytest.approx(2 / 3) and a["contains"] == pytest.approx(1.0)
    assert a["ended"] == pytest.approx(2 / 3) and a["answer_nll"] == pytest.approx(2.0) and a["n"] == 3
    assert b == {"exact": 0.0, "contains": 0.0, "ended": 1.0, "answer_nll": 4.0, "n": 1}
    # Families weigh the same whatever their counts, so a big family cannot hide a small one.
    assert m["exact"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["answer_nll"] == pytest.approx((2.0 + 4.0) / 2)


def test_score_replies_rejects_mismatched_inputs():
    with pytest.raises(ScalelabError):
        score_replies([_rec("a", "x")], ["x", "y"], [True], [1.0])
    with pytest.raises(ScalelabError):
        score_replies([], [], [], [])


def test_aggregate_means_and_spread_per_k():
    rows = [{"k": 2, "exact": 0.2, "contains": 0.4, "ended": 1.0, "answer_nll": 3.0},
            {"k": 0, "exact": 0.0, "contains": 0.0, "ended": 0.0, "answer_nll": 6.0},
            {"k": 2, "exact": 0.4, "contains": 0.6, "ended": 0.5, "answer_nll": 2.0}]
    out = aggregate(rows)
    assert [r["k"] for r in out] == [0, 2] and [r["runs"] for r in out] == [1, 2]
    assert out[1]["exact"] == pytest.approx(0.3) and out[1]["ended"] == pytest.approx(0.75)
    assert (out[1]["answer_nll_min"], out[1]["answer_nll"], out[1]["answer_nll_max"]) == pytest.approx((2.0, 2.5, 3.0))


def test_family_sets_are_nested_distinct_and_deterministic():
    pool = ["p", "q", "r", "s", "t", "u"]
    sets = family_sets(pool, [0, 1, 2, 4, 6], orders=3, seed=5)
    assert sets == family_sets(pool, [0, 1, 2, 4, 6], orders=3, seed=5)
    assert sets[0] == [()] and sets[6] == [tuple(sorted(pool))]
    for k, group in sets.items():
        assert len(group) == len(set(group)) and all(len(s) == k for s in group)
    # orders start from different families, so k = 1 gets one run per order
    assert len(sets[1]) == 3
    # each order's sets grow by adding families: every 1-family set is inside some 2-family set
    assert all(any(set(one) <= set(two) for two in sets[2]) for one in sets[1])


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
                   "counts = [0, 1, 2]\norders = 2\neval_per_family = 3\nmax_new_tokens = 4\n"
                   "[sft]\nn_examples = 40\nsteps = 2\nbatch_size = 4\neval_every = 2\n"
                   "[sft.optim]\nlr = 1e-3\nwarmup_steps = 10\n")
    assert main(["experiments", "flan", "-c", str(cfg)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["k"] for r in result["by_k"]] == [0, 1, 2]
    assert result["heldout_prompts"] == 3
    for r in result["runs"]:
        assert "classification" not in r["families"] and len(r["families"]) == r["k"]
        assert 0 <= r["exact"] <= r["contains"] <= 1 and r["answer_nll"] > 0
    assert (out / "flan.png").stat().st_size > 0 and "| training families |" in (out / "results.md").read_text()
    assert "results:" in capsys.readouterr().out
    # a bad design is one line on stderr and exit code 2
    code = main(["experiments", "flan", "-c", str(cfg), "--set", 'flan.heldout=["bogus"]'])
    err = capsys.readouterr().err
    assert code == 2 and "bogus" in err and len(err.strip().splitlines()) == 1
