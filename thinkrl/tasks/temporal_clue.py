"""Temporal Clue: Clue-style murder mysteries over rooms, times, weapons and motives.

Puzzles use the public format of bradhilton/temporal-clue (as used by OpenPipe ART)::

    {"num_clues": 12, "prompt": "On a dark winter night, ...", "solution": {"A": "Mrs. White", "B": "Lounge", ...}}

The model answers one line per question, ``A. Mrs. White``. `score` is the published grader: for
each question letter the last ``<letter>. <answer>`` match counts, compared case-insensitively;
reward = fraction correct. (The published character class has no digits, so a time answer such as
``D. 10:30 PM`` could never match; here digits are allowed.)

The task reads puzzle files (`data.train_path=.../val.json`, ``prompt_field=prompt``,
``answer_field=solution``) and generates new ones with OR-Tools CP-SAT (`generate`); the same
generator backs the CLI ``thinkrl puzzles temporal-clue --n N --seed S --out F`` (`main`).
Generation costs about 0.3 s (easy), 1.5 s (medium) and 5 s (hard) per puzzle on one CPU core, so
for large training sets write a file once with the CLI and train from it.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from thinkrl.tasks.base import Task, register_task
from thinkrl.tasks.temporal_clue_gen import MAIN_QUESTIONS, Puzzle, Spec, World
from thinkrl.types import Sample

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PRESETS = {  # difficulty -> (suspects, weapons, rooms, times, bonus) ranges, drawn per puzzle
    "easy": ((2, 3), (2, 3), (2, 4), (1, 1), (1, 2)),
    "medium": ((3, 5), (3, 4), (4, 6), (1, 3), (2, 3)),
    "hard": ((4, 6), (4, 6), (6, 9), (3, 5), (2, 4)),
}


# ----------------------------------------------------------------------------- grading


def score(response: str, solution: dict) -> float:
    """Fraction of questions whose last ``<letter>. <answer>`` line matches (case-insensitive)."""
    if not solution:
        return 0.0
    correct = 0
    for key, value in solution.items():
        matches = re.findall(rf"{re.escape(key)}\. ([A-Za-z0-9 \.:-]+)", response)
        if matches and matches[-1].strip().lower() == str(value).strip().lower():
            correct += 1
    return correct / len(solution)


def render_answer(solution: dict) -> str:
    """The solution in the expected answer format (one ``A. answer`` line per question)."""
    return "\n".join(f"{k}. {v}" for k, v in solution.items())


# ----------------------------------------------------------------------------- text


def _name(w: World, ref: tuple, cap: bool) -> str:
    kind = ref[0]
    text = {"S": lambda: w.suspects[ref[1]], "B": lambda: "Mr. Boddy", "M": lambda: "the murderer",
            "K": lambda: f"the suspect motivated by {w.motives[ref[1]]}", "W": lambda: f"the {w.weapons[ref[1]]}",
            "MW": lambda: "the murder weapon"}[kind]()
    return text[0].upper() + text[1:] if cap else text


def _in(w: World, r: int) -> str:
    room = w.rooms[r]
    return f"at the {room}" if room == "Fountain" else f"in the {room}"


def render_clue(w: World, c: tuple, cap: bool = True) -> str:
    """English for a clue tuple (see `temporal_clue_gen`)."""
    at = (lambda t: f" at {w.times[t]}") if w.T > 1 else (lambda t: "")
    n = lambda ref, first=False: _name(w, ref, cap and first)  # noqa: E731
    op = c[0]
    if op == "in":
        return f"{n(c[1], True)} was {_in(w, c[2])}{at(c[3])}"
    if op == "same":
        return f"{n(c[1], True)} was in the same room as {n(c[2])}{at(c[3])}"
    if op == "dir":
        return f"{n(c[1], True)} was in the room just {c[2]} of {n(c[3])}{at(c[4])}"
    if op == "together":
        return f"{n(c[1], True)} and {n(c[2])} were {_in(w, c[3])} together at least once"
    if op == "moved":
        return f"{n(c[1], True)} moved from the {w.rooms[c[2]]} to the {w.rooms[c[3]]}{at(c[4])}"
    if op == "carried":
        return f"{n(c[1], True)} moved {n(c[2])} from the {w.rooms[c[3]]} to the {w.rooms[c[4]]}{at(c[5])}"
    if op == "weapon_is":
        return f"Mr. Boddy was killed with the {w.weapons[c[1]]}"
    if op == "time_is":
        return f"Mr. Boddy was murdered at {w.times[c[1]]}"
    if op == "motive_is":
        return f"{w.suspects[c[1]]} is motivated by {w.motives[c[2]]}"
    if op in ("or", "iff"):
        joint = " or " if op == "or" else " if and only if "
        return render_clue(w, c[1], cap) + joint + render_clue(w, c[2], False)
    raise ValueError(f"unknown clue {c!r}")


def _question(w: World, q: tuple) -> tuple[str, str]:
    """(question text, answer category)."""
    fixed = {"who": ("Who murdered Mr. Boddy?", "SUSPECT"), "weapon": ("What weapon did the murderer use?", "WEAPON"),
             "where": ("Where was the murder committed?", "ROOM"), "when": ("When did the murder occur?", "TIME"),
             "why": ("Why did the murderer do it?", "MOTIVE")}
    if q[0] in fixed:
        return fixed[q[0]]
    if q[0] == "loc":
        return f"Where was {_name(w, q[1], False)}{f' at {w.times[q[2]]}' if w.T > 1 else ''}?", "ROOM"
    return f"Who is motivated by {w.motives[q[1]]}?", "SUSPECT"


def render_prompt(p: Puzzle) -> str:
    w = p.world
    width = len(str(len(w.rooms)))
    bullets = lambda items: "\n".join(f"• {x}" for x in items)  # noqa: E731
    rooms = "\n".join(f"{i + 1:0{width}d}. {r}" for i, r in enumerate(w.rooms))
    edge = lambda ch: "  " + " ".join(ch * width for _ in w.grid[0]) + "  "  # noqa: E731
    cells = lambda row: "|".join("-" if r is None else f"{r + 1:0{width}d}" for r in row)  # noqa: E731
    layout = "\n".join([edge("N"), *[f"W {cells(row)} E" for row in w.grid], edge("S")])
    parts = [
        "On a dark winter night, wealthy and enigmatic Mr. John Q. Boddy hosted a small, but lavish, dinner party for "
        "some of his closest associates. However, the night ended in tragedy when Mr. Boddy was found dead in one of the "
        "rooms of Tudor Mansion in the early hours of the morning. The following persons of interest have been "
        f"identified as suspects:\n\n{bullets(w.suspects)}",
        f"And the following weapons were found on the premises:\n\n{bullets(w.weapons)}",
        f"The murder could only have occured in one of the following rooms:\n\n{rooms}",
        f"The rooms are laid out as follows:\n\n{layout}",
    ]
    if w.T > 1:
        parts.append("The exact time of the murder is a bit uncertain, but it has been narrowed down to one of the "
                     f"following times:\n\n{bullets(w.times)}")
        parts.append("At every time the suspects and Mr. Boddy either stayed in their current room or moved to an "
                     "orthogonally adjacent room (north, south, east, or west). Weapons could be moved by suspects "
                     "between rooms as well.")
    if w.motives:
        parts.append(f"Each suspect uniquely had one of the following possible motives for killing Mr. Boddy:\n\n{bullets(w.motives)}")
    rule = "For the murder to occur, the murderer and Mr. Boddy must have been alone in a room with at least one weapon"
    parts.append(rule + (" at some point in the night. Any clue about Mr. Boddy's whereabouts should be read as "
                         "\"Mr. Boddy (dead or alive) ...\"" if w.T > 1 else "."))
    parts.append("The available clues are as follows:\n\n" + "\n".join(f"- {render_clue(w, c)}" for c in p.clues))
    qs = [_question(w, q) for q in p.questions]
    n_main = sum(q[0] in MAIN_QUESTIONS for q in p.questions)
    listing = [f"{LETTERS[i]}. {text}" for i, (text, _) in enumerate(qs)]
    parts.append("Please answer the following question(s):\n\n" + "\n".join(listing[:n_main]))
    if len(qs) > n_main:
        parts.append("And the following bonus question(s):\n\n" + "\n".join(listing[n_main:]))
    parts.append("Fill out your final answers in the following format:\n\n"
                 + "\n".join(f"{LETTERS[i]}. {cat}" for i, (_, cat) in enumerate(qs)))
    parts.append("Best of luck, detective.")
    return "\n\n".join(parts)


def to_public(p: Puzzle) -> dict:
    """The public JSON record of a puzzle."""
    return {"num_clues": len(p.clues), "prompt": render_prompt(p),
            "solution": {LETTERS[i]: a for i, a in enumerate(p.solution)}}


# ----------------------------------------------------------------------------- generation


def spec_for(difficulty: str, rng: random.Random, **fixed) -> Spec:
    """A Spec drawn from a difficulty preset; keyword arguments that are not None override it."""
    if difficulty not in PRESETS:
        raise ValueError(f"temporal clue: difficulty must be one of {', '.join(PRESETS)}, got {difficulty!r}")
    s, wp, r, t, b = (rng.randint(lo, hi) for lo, hi in PRESETS[difficulty])
    spec = Spec(suspects=s, weapons=wp, rooms=max(r, 2), times=t, bonus=b)
    for k, v in fixed.items():
        if v is not None:
            setattr(spec, k, tuple(v) if k == "questions" else v)
    return spec.validate()


def generate_puzzles(n: int, seed: int, difficulty: str = "medium", **fixed) -> list[dict]:
    """`n` puzzles in the public format; the same arguments give the same puzzles."""
    from thinkrl.tasks.temporal_clue_sat import generate_puzzle

    out = []
    for i in range(n):
        rng = random.Random(f"temporal-clue-{seed}-{i}")
        out.append(to_public(generate_puzzle(spec_for(difficulty, rng, **fixed), rng)))
    return out


def load_puzzles(path: str | Path, limit: int | None = None) -> list[Sample]:
    """Samples from a puzzle file in the public format (answer = the solution dict)."""
    from thinkrl.data.datasets import load_samples

    samples = load_samples(path, prompt_field="prompt", answer_field="solution", limit=limit)
    for s in samples:
        if not isinstance(s.answer, dict) or not s.answer:
            raise ValueError(f"{s.meta['source']}: field 'solution' must be a non-empty mapping of letters to answers")
    return samples


@register_task("temporal_clue")
class TemporalClue(Task):
    """Reward = fraction of questions answered correctly (`score`)."""

    reward_isolation = "inline"  # a few regex searches of escaped keys

    def __init__(self, system_prompt: str = "", difficulty: str = "medium", suspects: int | None = None,
                 weapons: int | None = None, rooms: int | None = None, times: int | None = None,
                 motives: bool | None = None, questions: list[str] | None = None, bonus: int | None = None, **params):
        super().__init__(system_prompt=system_prompt, **params)
        self.difficulty = difficulty
        self.knobs = dict(suspects=suspects, weapons=weapons, rooms=rooms, times=times, motives=motives,
                          questions=questions, bonus=bonus)
        spec_for(difficulty, random.Random(0), **self.knobs)  # validate now

    def reward(self, response: str, sample: Sample) -> float:
        if not isinstance(sample.answer, dict):
            raise ValueError(f"temporal_clue sample {sample.id}: answer must be the solution mapping, got {type(sample.answer).__name__}")
        return score(response, sample.answer)

    def generate(self, n: int, seed: int) -> list[Sample]:
        return [Sample(id=f"temporal-clue-{seed}-{i}", prompt=p["prompt"], answer=p["solution"],
                       meta={"num_clues": p["num_clues"]})
                for i, p in enumerate(generate_puzzles(n, seed, self.difficulty, **self.knobs))]

    def demonstration(self, sample: Sample, rng=None) -> str:
        return render_answer(sample.answer)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``thinkrl puzzles temporal-clue --n N --seed S --out F [--difficulty ...] [knobs]``."""
    ap = argparse.ArgumentParser(prog="thinkrl puzzles temporal-clue", description="Generate Temporal Clue puzzles (public JSON format).")
    ap.add_argument("--n", type=int, required=True, help="number of puzzles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output .json file (a list of puzzles)")
    ap.add_argument("--difficulty", choices=list(PRESETS), default="medium", help="size ranges drawn per puzzle")
    for knob in ("suspects", "weapons", "rooms", "times", "bonus"):
        ap.add_argument(f"--{knob}", type=int, default=None, help=f"fixed number of {knob} (overrides the preset)")
    ap.add_argument("--motives", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--questions", default=None, help=f"comma-separated main questions from {','.join(MAIN_QUESTIONS)}")
    a = ap.parse_args(argv)
    if a.n < 1:
        ap.error(f"--n must be >= 1, got {a.n}")
    questions = a.questions.split(",") if a.questions else None
    try:
        puzzles = generate_puzzles(a.n, a.seed, a.difficulty, suspects=a.suspects, weapons=a.weapons, rooms=a.rooms,
                                   times=a.times, motives=a.motives, questions=questions, bonus=a.bonus)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(puzzles, indent=1))
    print(f"wrote {len(puzzles)} puzzles to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
