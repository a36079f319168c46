"""``scalelab tasks show | check``: look at a reasoning task's problems and replies, and verify a reply."""

from __future__ import annotations

import json


def register(sub, add_config_args) -> dict:
    p = sub.add_parser("tasks", help="reasoning tasks: show problems with their replies, or verify a reply")
    actions = p.add_subparsers(dest="tasks_action", required=True, metavar="<action>")

    show = actions.add_parser("show", help="print problems and their rendered replies")
    show.add_argument("task", help="addition, multiplication, expression, countdown or sudoku")
    show.add_argument("--difficulty", "-d", type=int, default=None, help="default: the task's default difficulty")
    show.add_argument("--n", "-n", type=int, default=3, help="how many problems")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--cot", action="store_true", help="replies with the chain of thought (default: answer only)")

    check = actions.add_parser("check", help="verify a reply to one problem; prints the verify() result as JSON")
    check.add_argument("task")
    check.add_argument("--difficulty", "-d", type=int, default=None, help="default: the task's default difficulty")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--index", type=int, default=0, help="which problem of the (seed, difficulty) list, from 0")
    check.add_argument("--reply", required=True, help='the reply text, whose last line is "Answer: ..."')
    return {"tasks": _run}


def _run(args) -> None:
    from scalelab.errors import ScalelabError
    from scalelab.tasks import get_task
    from scalelab.tasks.answer_format import render_reply, verify

    task = get_task(args.task)
    difficulty = task.default_difficulty if args.difficulty is None else args.difficulty
    if args.tasks_action == "show":
        for i, problem in enumerate(task.generate(args.n, args.seed, difficulty)):
            print(f"--- {task.name} #{i} (difficulty {difficulty}, seed {args.seed}) ---")
            print(problem.prompt)
            print(render_reply(problem, with_thinking=args.cot))
        return
    if args.index < 0:
        raise ScalelabError(f"--index must be >= 0, got {args.index}")
    problem = task.generate(args.index + 1, args.seed, difficulty)[args.index]
    print(json.dumps(verify(problem, args.reply)))
