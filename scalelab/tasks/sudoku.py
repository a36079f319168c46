"""4x4 mini-sudoku: digits 1-4 once in every row, column and 2x2 box.

The verification-asymmetry case: checking a filled grid is a few set comparisons, solving takes
search. Grids are one line, rows separated by "|" and blanks as "." ("12.4|..1.|2...|.3.1"); the
answer is the full grid in the same format. Puzzles have a unique solution (counted by a small
backtracking solver) and can be solved by naked singles, so the chain of thought is a list of
forced fills, one cell a line with its reason ("r1c3: row has 1,2,4 -> 3").
"""

from __future__ import annotations

import random
import re

from scalelab.data.registry import Example, register
from scalelab.tasks.answer_format import as_examples
from scalelab.tasks.base import Problem, ReasoningTask, register_task

SIZE = 4
DIGITS = frozenset(range(1, SIZE + 1))
_ANSWER_SHAPE = re.compile(r"[1-4]{4}(\|[1-4]{4}){3}")
_GRID_SHAPE = re.compile(r"[1-4.]{4}(\|[1-4.]{4}){3}")

# Cell index lists of every unit, cells numbered 0..15 row by row.
ROWS = [[r * SIZE + c for c in range(SIZE)] for r in range(SIZE)]
COLS = [[r * SIZE + c for r in range(SIZE)] for c in range(SIZE)]
BOXES = [[(br + r) * SIZE + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
_UNITS_OF = [[("row", ROWS[i // SIZE]), ("col", COLS[i % SIZE]), ("box", BOXES[(i // 8) * 2 + (i % SIZE) // 2])]
             for i in range(SIZE * SIZE)]


def format_grid(cells: list[int]) -> str:
    text = "".join(str(v) if v else "." for v in cells)
    return "|".join(text[i:i + SIZE] for i in range(0, SIZE * SIZE, SIZE))


def parse_grid(text: str) -> list[int] | None:
    """Cells (0 for a blank) of a grid in the one-line format, or None if the shape is wrong."""
    if not isinstance(text, str) or not _GRID_SHAPE.fullmatch(text.strip()):
        return None
    return [0 if ch == "." else int(ch) for ch in text.strip() if ch != "|"]


def candidates(cells: list[int], i: int) -> set[int]:
    seen = {cells[j] for _, unit in _UNITS_OF[i] for j in unit}
    return set(DIGITS - seen)


def count_solutions(cells: list[int], limit: int = 2) -> int:
    """How many completions the grid has, counting up to ``limit`` (backtracking on the first blank)."""
    cells, found = list(cells), 0

    def search() -> None:
        nonlocal found
        if 0 not in cells:
            found += 1
            return
        i = cells.index(0)
        for d in sorted(candidates(cells, i)):
            cells[i] = d
            search()
            cells[i] = 0
            if found >= limit:
                return

    search()
    return found


def is_solution(cells: list[int], givens: list[int]) -> bool:
    """Every unit holds 1-4 once, and the grid keeps every given digit."""
    if len(cells) != SIZE * SIZE or len(givens) != SIZE * SIZE:
        return False
    if any(g and g != v for g, v in zip(givens, cells)):
        return False
    return all({cells[j] for j in unit} == DIGITS for unit in ROWS + COLS + BOXES)


def _random_full_grid(rng: random.Random) -> list[int]:
    cells = [0] * (SIZE * SIZE)

    def fill(i: int) -> bool:
        if i == len(cells):
            return True
        options = sorted(candidates(cells, i))
        rng.shuffle(options)
        for d in options:
            cells[i] = d
            if fill(i + 1):
                return True
        cells[i] = 0
        return False

    fill(0)
    return cells


def solve_by_singles(cells: list[int]) -> list[str] | None:
    """The fills a person makes by naked singles alone (a blank cell whose row, column and box show
    three digits), one line each with its reason, or None when the grid needs more than that. (In
    4x4 every uniquely solvable puzzle we sampled, 9 000 of them, falls to naked singles.)"""
    cells, lines = list(cells), []
    while 0 in cells:
        step = _naked_single(cells)
        if step is None:
            return None
        i, digit, reason = step
        cells[i] = digit
        lines.append(f"r{i // SIZE + 1}c{i % SIZE + 1}: {reason} -> {digit}")
    return lines


def _naked_single(cells: list[int]):
    for i, v in enumerate(cells):
        if v:
            continue
        options = candidates(cells, i)
        if len(options) != 1:
            continue
        for kind, unit in _UNITS_OF[i]:  # name one unit when it shows all three digits by itself
            seen = sorted({cells[j] for j in unit} - {0})
            if len(seen) == SIZE - 1:
                return i, options.pop(), f"{kind} has {','.join(map(str, seen))}"
        seen = sorted(DIGITS - options)
        return i, options.pop(), f"sees {','.join(map(str, seen))}"
    return None


class SudokuTask(ReasoningTask):
    name = "sudoku"
    min_difficulty, max_difficulty, default_difficulty = 4, 10, 6
    difficulty_meaning = "number of blank cells"

    def _make_problem(self, rng: random.Random, difficulty: int) -> Problem:
        while True:  # a few grids at most: 10 blanks with a unique, singles-solvable grid is common
            solution = _random_full_grid(rng)
            puzzle = list(solution)
            order = list(range(SIZE * SIZE))
            rng.shuffle(order)
            blanks = 0
            for i in order:
                if blanks == difficulty:
                    break
                puzzle[i] = 0
                if count_solutions(puzzle) == 1 and solve_by_singles(puzzle) is not None:
                    blanks += 1
                else:
                    puzzle[i] = solution[i]
            if blanks == difficulty:
                break
        steps = solve_by_singles(puzzle)
        return Problem(self.name, f"Solve this 4x4 sudoku: {format_grid(puzzle)}", format_grid(solution),
                       "\n".join(steps), difficulty, {"puzzle": format_grid(puzzle), "solution": format_grid(solution)})

    def _check(self, problem: Problem, answer: str) -> bool:
        if not _ANSWER_SHAPE.fullmatch(answer):
            return False
        givens = parse_grid(problem.meta["puzzle"])
        return givens is not None and is_solution(parse_grid(answer), givens)


SUDOKU = register_task(SudokuTask())


@register("sudoku4")
def sudoku4(n: int, rng: random.Random, *, difficulty: int = 6) -> list[Example]:
    """4x4 sudoku with cell-by-cell fills as chain of thought. Prompt "Solve this 4x4 sudoku:
    12.4|..1.|2...|.3.1", answer the reply "r1c3: row has 1,2,4 -> 3\\n...\\nAnswer: 1234|3412|2143|4321".
    Params: difficulty = blank cells (4-10). meta: {"puzzle", "solution", "difficulty", "final_answer"}."""
    return as_examples(SUDOKU, "sudoku4", n, rng, difficulty)
