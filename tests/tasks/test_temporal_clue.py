"""Temporal Clue: the published grader, the generator's uniqueness (CP-SAT and brute force), the task."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from thinkrl.data.datasets import fixture_path
from thinkrl.tasks import make_task
from thinkrl.tasks.temporal_clue import generate_puzzles, load_puzzles, main, render_answer, render_clue, score, to_public
from thinkrl.tasks.temporal_clue_gen import (Spec, World, _random_any, answer, candidate_clues, holds, random_world,
                                             refs, valid_world)
from thinkrl.tasks.temporal_clue_sat import SatModel, check_unique, generate_puzzle

VAL = fixture_path("temporal_clue/val.json")


# ----------------------------------------------------------------------------- grading


def test_published_solutions_score_one_and_wrong_answers_score_fractionally():
    puzzles = json.loads(VAL.read_text())
    assert len(puzzles) == 64
    for p in puzzles:
        sol = p["solution"]
        assert score(render_answer(sol), sol) == 1.0
        wrong = dict(sol, A="Nobody")
        assert score(render_answer(wrong), sol) == pytest.approx((len(sol) - 1) / len(sol))


def test_score_rules_last_match_case_and_missing():
    sol = {"A": "Mrs. White", "B": "Lead Pipe", "C": "10:30 PM", "D": "Trophy Room"}
    assert score("A. mrs. white\nB. LEAD PIPE\nC. 10:30 pm\nD. Trophy Room", sol) == 1.0
    # the last match per letter counts: a corrected answer wins, a later wrong one loses
    assert score("A. Mr. Green\nA. Mrs. White\nB. Lead Pipe", sol) == 0.5
    assert score("A. Mrs. White\nA. Mr. Green", sol) == 0.0
    assert score("", sol) == 0.0
    assert score("The murderer is Mrs. White.", sol) == 0.0
    assert score("A.Mrs. White", sol) == 0.0  # the published format needs "A. "


# ----------------------------------------------------------------------------- the clue encoding


def _random_clue(w: World, rng: random.Random) -> tuple:
    """A random clue, true or false, of any kind."""
    T, every, R = w.T, refs(w), len(w.rooms)
    x, y, t = rng.choice(every), rng.choice(every), rng.randrange(T)
    kind = rng.choice(["in", "same", "dir", "together", "moved", "carried", "weapon_is", "time_is", "motive_is", "or", "iff"])
    if kind == "same":
        return ("same", x, y, t)
    if kind == "dir":
        return ("dir", x, rng.choice(["north", "south", "east", "west"]), y, t)
    if kind == "together":
        return ("together", x, y, rng.randrange(R))
    if kind in ("moved", "carried") and T > 1:
        a = rng.randrange(R)
        b = rng.choice(w.adjacent(a) or [a])
        person = rng.choice(refs(w, weapons=False))
        if kind == "moved":
            return ("moved", person, a, b, rng.randrange(1, T))
        return ("carried", person, rng.choice([("W", 0), ("MW",)]), a, b, rng.randrange(1, T))
    if kind == "weapon_is":
        return ("weapon_is", rng.randrange(len(w.weapons)))
    if kind == "time_is":
        return ("time_is", t)
    if kind == "motive_is" and w.motives:
        return ("motive_is", rng.randrange(len(w.suspects)), rng.randrange(len(w.motives)))
    if kind in ("or", "iff"):
        return (kind, _random_any(w, rng), _random_clue(w, rng))
    return ("in", x, rng.randrange(R), t)


def _fix(sat: SatModel, w: World) -> list:
    """Assumption literals that pin the CP-SAT variables to night w."""
    lits = [sat.at[p][w.pos[p][t]][t] for p in range(len(w.pos)) for t in range(w.T)]
    lits += [sat.wat[j][w.wpos[j][t]][t] for j in range(len(w.weapons)) for t in range(w.T)]
    lits += [sat.isM[w.murderer], sat.isW[w.weapon], sat.isT[w.mtime], sat.isR[w.mroom]]
    return lits + [sat.mot[s][w.motive[s]] for s in range(len(w.motive))]


@pytest.mark.parametrize("spec", [Spec(3, 2, 4, 1), Spec(3, 2, 5, 3), Spec(4, 3, 6, 4, motives=False)])
def test_cpsat_clue_literals_agree_with_python_semantics(spec):
    rng = random.Random(7)
    for _ in range(3):
        w = random_world(spec, rng)
        assert valid_world(w, body_stays=True)
        clues = [_random_clue(w, rng) for _ in range(60)] + candidate_clues(w, 30, rng)
        truth = [holds(w, c) for c in clues]
        assert 5 < sum(truth) < len(truth)  # both true and false clues are checked
        sat = SatModel(w)
        lits = [sat.clue(c) for c in clues]
        ok, value = sat.solve(_fix(sat, w))
        assert ok, "a valid night must satisfy the CP-SAT rules"
        assert [bool(value(lit)) for lit in lits] == truth


def test_cpsat_rejects_a_night_that_breaks_the_rules():
    w = random_world(Spec(3, 2, 4, 1), random.Random(3))
    other = next(s for s in range(3) if s != w.murderer)
    w.pos[other][0] = w.mroom  # now the murderer is not alone with Mr. Boddy
    assert not valid_world(w)
    sat = SatModel(w)
    assert not sat.solve(_fix(sat, w))[0]


# ----------------------------------------------------------------------------- uniqueness


def _all_nights(like: World):
    """Every night with like's names and sizes that obeys the rules (brute force, tiny puzzles only)."""
    S, W, R, T = len(like.suspects), len(like.weapons), len(like.rooms), like.T
    for pos in itertools.product(itertools.product(range(R), repeat=T), repeat=S + 1):
        for wpos in itertools.product(itertools.product(range(R), repeat=T), repeat=W):
            for murderer, weapon, mtime in itertools.product(range(S), range(W), range(T)):
                for motive in itertools.permutations(range(len(like.motives))):
                    w = World(like.suspects, like.weapons, like.rooms, like.times, like.motives, like.grid,
                              [list(p) for p in pos], [list(x) for x in wpos], list(motive), murderer, weapon, mtime)
                    if valid_world(w):
                        yield w


@pytest.mark.parametrize("spec,seed", [(Spec(3, 2, 3, 1, bonus=2), 0), (Spec(2, 1, 2, 2, bonus=2), 1), (Spec(2, 2, 2, 2, bonus=1), 4)])
def test_generated_puzzles_have_one_answer_by_brute_force(spec, seed):
    p = generate_puzzle(spec, random.Random(seed))
    assert p.clues and check_unique(p)
    answers = {tuple(answer(w, q) for q in p.questions) for w in _all_nights(p.world) if all(holds(w, c) for c in p.clues)}
    assert answers == {tuple(p.solution)}
    # and every clue is needed: without any one of them, some answer is ambiguous
    for i in range(len(p.clues)):
        fewer = [c for j, c in enumerate(p.clues) if j != i]
        assert not check_unique(type(p)(p.world, fewer, p.questions))


@pytest.mark.parametrize("seed", range(3))
def test_generated_medium_puzzles_are_unique_by_cpsat(seed):
    rng = random.Random(seed)
    p = generate_puzzle(Spec(4, 3, 5, 3, bonus=2, candidates=60), rng)
    assert check_unique(p)
    assert not check_unique(type(p)(p.world, p.clues[: len(p.clues) // 2], p.questions))
    pub = to_public(p)
    assert set(pub) == {"num_clues", "prompt", "solution"} and pub["num_clues"] == len(p.clues)
    assert score(render_answer(pub["solution"]), pub["solution"]) == 1.0
    for c in p.clues:
        assert f"- {render_clue(p.world, c)}\n" in pub["prompt"] + "\n"


def test_prompt_follows_the_public_format():
    pub = generate_puzzles(1, seed=3, difficulty="easy", times=2, bonus=1)[0]
    ref = json.loads(VAL.read_text())[0]["prompt"]
    for section in ("The following persons of interest have been identified as suspects:", "The rooms are laid out as follows:",
                    "The available clues are as follows:", "Please answer the following question(s):",
                    "Fill out your final answers in the following format:"):
        assert section in pub["prompt"] and section in ref
    assert pub["prompt"].endswith("Best of luck, detective.")
    letters = list(pub["solution"])
    assert letters == [chr(ord("A") + i) for i in range(len(letters))]
    for k in letters:
        assert f"\n{k}. " in pub["prompt"]


def test_generation_is_deterministic_per_seed():
    a = generate_puzzles(2, seed=11, difficulty="easy")
    assert a == generate_puzzles(2, seed=11, difficulty="easy")
    assert a != generate_puzzles(2, seed=12, difficulty="easy")


# ----------------------------------------------------------------------------- task and CLI


def test_task_on_public_puzzles_and_generated_ones():
    task = make_task("temporal_clue", {"difficulty": "easy"})
    samples = load_puzzles(VAL, limit=3)
    s = samples[0]
    assert task.build_prompt(s) == [{"role": "user", "content": s.prompt}]
    assert task.reward(task.demonstration(s), s) == 1.0
    assert task.reward("no idea", s) == 0.0
    gen = task.generate(2, seed=0)
    assert len(gen) == 2 and all(task.reward(task.demonstration(g), g) == 1.0 for g in gen)
    with pytest.raises(ValueError, match="colour"):
        make_task("temporal_clue", {"colour": 1})
    with pytest.raises(ValueError, match="suspects"):
        make_task("temporal_clue", {"suspects": 99})


def test_cli_writes_puzzles(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["--n", "2", "--seed", "1", "--out", str(out), "--difficulty", "easy", "--questions", "who,where"]) == 0
    data = json.loads(out.read_text())
    assert len(data) == 2 and all("Who murdered Mr. Boddy?" in p["prompt"] for p in data)
    assert all("What weapon" not in p["prompt"] for p in data)
    assert main(["--n", "1", "--out", str(out), "--rooms", "1"]) == 2
    assert "rooms must be in" in capsys.readouterr().err
