"""Reasoning tasks: generators, chain-of-thought replies, verifiers, the reward, the registry hook, the CLI."""

import json

import pytest

from scalelab.cli import main
from scalelab.data.generators import available, generate
from scalelab.errors import ScalelabError
from scalelab.tasks import TASKS, Problem, get_task
from scalelab.tasks.answer_format import (ANSWER_MARKER, force_answer_suffix, make_reward, parse_answer,
                                          render_reply, verify)
from scalelab.tasks.countdown import evaluate, solve
from scalelab.tasks.sudoku import candidates, count_solutions, format_grid, parse_grid

ALL_LEVELS = [(name, d) for name, t in TASKS.items() for d in range(t.min_difficulty, t.max_difficulty + 1)]


def one(name, difficulty=None, seed=0):
    task = get_task(name)
    return task.generate(1, seed, task.default_difficulty if difficulty is None else difficulty)[0]


def wrong_answer(problem):
    """A well-formed but wrong final answer for any task."""
    if problem.task == "countdown":
        return " + ".join(map(str, problem.meta["numbers"])) + " + 1"  # 1 is not given, or is used twice
    if problem.task == "sudoku":
        row = problem.answer.split("|")
        return "|".join(row[1:] + row[:1])  # rows rotated: still a Latin square by rows, breaks givens/boxes
    return str(int(problem.answer) + 1)


def test_registry_names_and_unknown_task():
    assert set(TASKS) == {"addition", "multiplication", "expression", "countdown", "sudoku"}
    assert all(TASKS[n].name == n for n in TASKS)
    with pytest.raises(ScalelabError, match=r"unknown reasoning task 'nope' \(known: addition, .*sudoku\)"):
        get_task("nope")


@pytest.mark.parametrize("name,difficulty", ALL_LEVELS)
def test_every_rendered_cot_reply_verifies_and_stays_compact(name, difficulty):
    for p in get_task(name).generate(4, 11, difficulty):
        assert p.task == name and p.difficulty == difficulty and "\n" not in p.prompt
        assert ANSWER_MARKER not in p.thinking and ANSWER_MARKER not in p.prompt
        for with_thinking in (True, False):
            reply = render_reply(p, with_thinking)
            assert reply.splitlines()[-1] == f"Answer: {p.answer}"
            assert verify(p, reply) == {"correct": True, "formatted": True, "answer": p.answer}
        # The brief's sizes: ~200 characters for arithmetic, ~350 for the puzzles; 5-operation
        # expressions restate what is left after each step and reach ~212.
        budget = {"countdown": 350, "sudoku": 350, "expression": 230}.get(name, 200)
        assert len(p.prompt) + 1 + len(render_reply(p, True)) <= budget


@pytest.mark.parametrize("name", list(TASKS))
def test_verifiers_on_correct_wrong_and_malformed_replies(name):
    p = one(name)
    task = get_task(name)
    assert task.check(p, p.answer) and task.check(p, f"  {p.answer} ")
    assert not task.check(p, wrong_answer(p))
    assert verify(p, f"Answer: {wrong_answer(p)}") == {"correct": False, "formatted": True, "answer": wrong_answer(p)}
    garbage = ["", "   ", "banana", "Answer:", "Answer: __import__('os').system('echo hi')", "1e9999",
               "9" * 5000, "(" * 300, "\x00\xff", "lambda: 1", "[1, 2]", "1/0", "-", "٣"]
    for text in garbage:
        result = verify(p, text)
        assert result["correct"] is False and set(result) == {"correct", "formatted", "answer"}
        assert task.check(p, text) is False
    assert verify(p, "no answer line at all") == {"correct": False, "formatted": False, "answer": None}
    assert task.check(p, None) is False


def test_parse_answer_takes_the_last_marker_to_end_of_line():
    assert parse_answer("Answer: 3\nthinking more\nAnswer:  42 \n") == "42"
    assert parse_answer("x\nAnswer: 7\ntrailing words") == "7"
    assert parse_answer("Answer:\n") is None and parse_answer("nothing") is None and parse_answer(None) is None
    assert force_answer_suffix() == "\nAnswer:"
    p = one("addition")
    assert parse_answer(p.thinking + force_answer_suffix() + " " + p.answer) == p.answer


def test_countdown_verifier_is_strict_and_safe():
    p = Problem("countdown", "Use 3 5 4 to make 32.", "(3 + 5) * 4", "", 3, {"numbers": [3, 5, 4], "target": 32})
    check = get_task("countdown").check
    assert check(p, "(3 + 5) * 4") and check(p, "4*(5+3)") and check(p, "(3 + 5) * 4 = 32")
    assert not check(p, "(3 + 5) * 4 = 31")
    assert not check(p, "(3 + 5) * 4 + 0")  # 0 is not given
    assert not check(p, "(3 + 3) * 4 + 8")  # 3 used twice
    assert not check(p, "(3 + 5) ** 4") and not check(p, "(3 + 5) // 4 * 32") and not check(p, "-(-32)")
    assert not check(p, "__import__('os')") and not check(p, "(3 + 5) * 4.0") and not check(p, "True * 32")
    q = Problem("countdown", "", "", "", 2, {"numbers": [7, 2, 4], "target": 14})
    assert not get_task("countdown").check(q, "7 / 2 * 4")  # 3.5 * 4: the division is not exact
    assert get_task("countdown").check(q, "7 * 4 / 2")
    assert evaluate("8 / 0", [8, 0]) is None and evaluate("3 - 5", [3, 5]) == -2


def test_countdown_instances_are_solvable_with_the_given_numbers():
    for difficulty in range(2, 6):
        for p in get_task("countdown").generate(6, 3, difficulty):
            assert len(p.meta["numbers"]) == difficulty and 1 <= p.meta["target"] <= 999
            assert evaluate(p.answer, p.meta["numbers"]) == p.meta["target"]
            found = solve(p.meta["numbers"], p.meta["target"])
            assert found is not None and evaluate(found, p.meta["numbers"]) == p.meta["target"]


def test_sudoku_puzzles_have_a_unique_solution_and_the_verifier_checks_the_rules():
    for difficulty in range(4, 11):
        for p in get_task("sudoku").generate(3, 5, difficulty):
            puzzle = parse_grid(p.meta["puzzle"])
            assert puzzle.count(0) == difficulty and count_solutions(puzzle) == 1
            assert len(p.thinking.splitlines()) == difficulty  # one fill per blank
            cells = list(puzzle)
            for line in p.thinking.splitlines():  # every step names a blank and the digit it is forced to
                cell, digit = (int(line[1]) - 1) * 4 + int(line[3]) - 1, int(line[-1])
                assert cells[cell] == 0 and candidates(cells, cell) == {digit}
                cells[cell] = digit
            assert format_grid(cells) == p.answer
    p = one("sudoku", 8)
    check = get_task("sudoku").check
    for bad in ["1234|3412|2143", "1234|3412|2143|43211", "1234 3412 2143 4321", "12.4|3412|2143|4321",
                "5234|3412|2143|4321", "1111|2222|3333|4444"]:
        assert not check(p, bad)
    assert count_solutions([0] * 16, limit=5) == 5 and count_solutions([0] * 16, limit=1000) == 288  # all 4x4 grids


def test_generation_is_deterministic_differs_by_seed_and_checks_its_arguments():
    for name, task in TASKS.items():
        d = task.max_difficulty
        a, b, c = task.generate(5, 1, d), task.generate(5, 1, d), task.generate(5, 2, d)
        assert a == b and a != c
        assert task.generate(3, 1, d) == a[:3]  # an index names the same problem in any list length
        for bad in (task.min_difficulty - 1, task.max_difficulty + 1, "3", True):
            with pytest.raises(ScalelabError, match="difficulty"):
                task.generate(2, 0, bad)
        with pytest.raises(ScalelabError, match="number of problems"):
            task.generate(0, 0, d)


def test_make_reward_combines_correctness_and_format():
    p = one("multiplication")
    reward = make_reward()
    assert reward(p, render_reply(p, True)) == pytest.approx(1.1)
    assert reward(p, f"Answer: {wrong_answer(p)}") == pytest.approx(0.1)
    assert reward(p, "I am not sure") == pytest.approx(-0.1)
    strict = make_reward(correct=1.0, formatted=0.0, wrong=0.0, malformed=0.0)
    assert [strict(p, f"Answer: {p.answer}"), strict(p, "Answer: x"), strict(p, "")] == [1.0, 0.0, 0.0]
    with pytest.raises(ScalelabError, match="malformed"):
        make_reward(malformed="-1")


def test_cot_generators_are_in_the_data_registry():
    assert {"cot_addition", "cot_multiplication", "cot_expression", "countdown", "sudoku4"} <= set(available())
    for name, task in [("cot_addition", "addition"), ("cot_multiplication", "multiplication"),
                       ("cot_expression", "expression"), ("countdown", "countdown"), ("sudoku4", "sudoku")]:
        examples = generate(name, 5, seed=2, difficulty=get_task(task).max_difficulty)
        assert examples == generate(name, 5, seed=2, difficulty=get_task(task).max_difficulty)
        assert generate(name, 0, seed=2) == []
        for e in examples:
            assert e.task == name and e.text == f"{e.prompt} {e.answer}"
            assert parse_answer(e.answer) == e.meta["final_answer"] and "\n" in e.answer  # thinking included
        with pytest.raises(ScalelabError, match="difficulty"):
            generate(name, 2, seed=0, difficulty=99)


def test_cli_show_check_and_unknown_task(capsys):
    assert main(["tasks", "show", "addition", "--difficulty", "2", "--n", "2", "--seed", "3", "--cot"]) == 0
    out = capsys.readouterr().out
    problems = get_task("addition").generate(2, 3, 2)
    for p in problems:
        assert p.prompt in out and render_reply(p, True) in out
    assert main(["tasks", "show", "sudoku"]) == 0 and "Answer: " in capsys.readouterr().out

    p = get_task("countdown").generate(3, 4, 3)[2]
    assert main(["tasks", "check", "countdown", "--seed", "4", "--difficulty", "3", "--index", "2",
                 "--reply", f"thinking\nAnswer: {p.answer}"]) == 0
    assert json.loads(capsys.readouterr().out) == {"correct": True, "formatted": True, "answer": p.answer}
    assert main(["tasks", "check", "countdown", "--seed", "4", "--difficulty", "3", "--index", "2",
                 "--reply", "no idea"]) == 0
    assert json.loads(capsys.readouterr().out) == {"correct": False, "formatted": False, "answer": None}

    assert main(["tasks", "show", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalelab: error: unknown reasoning task 'nope'")
    assert main(["tasks", "show", "sudoku", "--difficulty", "11"]) == 2
    assert "difficulty" in capsys.readouterr().err
