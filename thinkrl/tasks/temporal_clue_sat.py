"""CP-SAT side of the Temporal Clue generator: the rules as constraints, uniqueness proofs, clue selection.

`generate_puzzle(spec, rng)` draws a night (`temporal_clue_gen.random_world`), offers true
candidate clues, and repeatedly asks CP-SAT for a second night that satisfies the chosen clues but
answers some question differently; a clue violated by that counterexample is added until none
exists (INFEASIBLE), then clues that are not needed are dropped. `check_unique` re-proves a
finished puzzle from scratch.
"""
from __future__ import annotations

import random

from thinkrl.tasks.temporal_clue_gen import (CLUE_WEIGHTS, Puzzle, Spec, World, answer, candidate_clues, holds,
                                             make_questions, random_world, valid_world)


class SatModel:
    """The rules as boolean CP-SAT constraints over a night with `w`'s names, grid and sizes.

    ``at[p][r][t]``: person p in room r at time t; ``wat[j][r][t]`` likewise for weapons; one-hot
    murderer / murder weapon / time / room, and a motive permutation. Clues and answers become
    reified literals; `solve(assumptions)` looks for a night where all assumed literals hold.
    """

    def __init__(self, w: World, seed: int = 0, max_time_s: float = 30.0):
        from ortools.sat.python import cp_model

        self.cp, self.w, self.seed, self.max_time_s = cp_model, w, seed, max_time_s
        m = self.m = cp_model.CpModel()
        S, W, R, T, K = len(w.suspects), len(w.weapons), len(w.rooms), w.T, len(w.motives)
        self.cache: dict = {}
        B = lambda: m.new_bool_var("")  # noqa: E731
        self.false = B()
        m.add(self.false == 0)
        self.at = [[[B() for _ in range(T)] for _ in range(R)] for _ in range(S + 1)]
        self.wat = [[[B() for _ in range(T)] for _ in range(R)] for _ in range(W)]
        self.isM, self.isW = [B() for _ in range(S)], [B() for _ in range(W)]  # murderer, murder weapon
        self.isT, self.isR = [B() for _ in range(T)], [B() for _ in range(R)]  # murder time, murder room
        self.mot = [[B() for _ in range(K)] for _ in range(S)]
        for group in (self.isM, self.isW, self.isT, self.isR):
            m.add_exactly_one(group)
        if K:
            for s in range(S):
                m.add_exactly_one(self.mot[s])
            for k in range(K):
                m.add_exactly_one([self.mot[s][k] for s in range(S)])
        for grid in self.at + self.wat:
            for t in range(T):
                m.add_exactly_one([grid[r][t] for r in range(R)])
                if t:  # stay or step to an adjacent room
                    for r in range(R):
                        m.add_bool_or([grid[q][t - 1] for q in [r, *w.adjacent(r)]]).only_enforce_if(grid[r][t])
        for j in range(W):  # a weapon moves only along with a suspect making the same move
            for t in range(1, T):
                for r in range(R):
                    for q in w.adjacent(r):
                        carriers = [self.and_([self.at[s][r][t - 1], self.at[s][q][t]]) for s in range(S)]
                        m.add_bool_or(carriers).only_enforce_if([self.wat[j][r][t - 1], self.wat[j][q][t]])
        for t in range(T):  # the murder: murderer alone with Mr. Boddy and the weapon
            for r in range(R):
                when = [self.isT[t], self.isR[r]]
                m.add_bool_and([self.at[S][r][t]]).only_enforce_if(when)
                m.add(sum(self.at[s][r][t] for s in range(S)) == 1).only_enforce_if(when)
                for s in range(S):
                    m.add_bool_and([self.at[s][r][t]]).only_enforce_if(when + [self.isM[s]])
                for j in range(W):
                    m.add_bool_and([self.wat[j][r][t]]).only_enforce_if(when + [self.isW[j]])

    # -- reified helpers (cached)
    def and_(self, lits: list):
        return self._reify("and", lits)

    def or_(self, lits: list):
        return self._reify("or", lits)

    def _reify(self, op: str, lits: list):
        if not lits:
            return self.false if op == "or" else self.false.Not()
        if len(lits) == 1:
            return lits[0]
        key = (op, tuple(sorted(lit.index for lit in lits)))
        if key not in self.cache:
            z = self.m.new_bool_var("")
            if op == "and":
                self.m.add_bool_and(lits).only_enforce_if(z)
                self.m.add_bool_or([lit.Not() for lit in lits] + [z])
            else:
                self.m.add_bool_or(lits).only_enforce_if(z)
                for lit in lits:
                    self.m.add_implication(lit, z)
            self.cache[key] = z
        return self.cache[key]

    def loc(self, ref: tuple, r: int, t: int):
        """Literal: the referenced person/weapon is in room r at time t."""
        kind, S = ref[0], len(self.w.suspects)
        if kind == "S":
            return self.at[ref[1]][r][t]
        if kind == "B":
            return self.at[S][r][t]
        if kind == "W":
            return self.wat[ref[1]][r][t]
        if kind == "M":
            return self.or_([self.and_([self.isM[s], self.at[s][r][t]]) for s in range(S)])
        if kind == "K":
            return self.or_([self.and_([self.mot[s][ref[1]], self.at[s][r][t]]) for s in range(S)])
        return self.or_([self.and_([self.isW[j], self.wat[j][r][t]]) for j in range(len(self.w.weapons))])

    def clue(self, c: tuple):
        """Literal equivalent to clue c (same meaning as `holds`)."""
        w, R, op = self.w, range(len(self.w.rooms)), c[0]
        if op == "in":
            return self.loc(c[1], c[2], c[3])
        if op == "same":
            return self.or_([self.and_([self.loc(c[1], r, c[3]), self.loc(c[2], r, c[3])]) for r in R])
        if op == "dir":
            pairs = [(r, n) for r in R if (n := w.neighbor(r, c[2])) is not None]
            return self.or_([self.and_([self.loc(c[1], n, c[4]), self.loc(c[3], r, c[4])]) for r, n in pairs])
        if op == "together":
            return self.or_([self.and_([self.loc(c[1], c[3], t), self.loc(c[2], c[3], t)]) for t in range(w.T)])
        if op == "moved":
            return self.and_([self.loc(c[1], c[2], c[4] - 1), self.loc(c[1], c[3], c[4])])
        if op == "carried":
            return self.and_([self.clue(("moved", c[1], c[3], c[4], c[5])), self.clue(("moved", c[2], c[3], c[4], c[5]))])
        if op == "weapon_is":
            return self.isW[c[1]]
        if op == "time_is":
            return self.isT[c[1]]
        if op == "motive_is":
            return self.mot[c[1]][c[2]]
        if op == "or":
            return self.or_([self.clue(c[1]), self.clue(c[2])])
        if op == "iff":
            a, b = self.clue(c[1]), self.clue(c[2])
            return self.or_([self.and_([a, b]), self.and_([a.Not(), b.Not()])])
        raise ValueError(f"unknown clue {c!r}")

    def answer_is(self, q: tuple, text: str):
        """Literal: question q has answer `text`."""
        w, kind = self.w, q[0]
        if kind == "who":
            return self.isM[w.suspects.index(text)]
        if kind == "weapon":
            return self.isW[w.weapons.index(text)]
        if kind == "where":
            return self.isR[w.rooms.index(text)]
        if kind == "when":
            return self.isT[w.times.index(text)]
        if kind == "why":
            k = w.motives.index(text)
            return self.or_([self.and_([self.isM[s], self.mot[s][k]]) for s in range(len(w.suspects))])
        if kind == "loc":
            return self.loc(q[1], w.rooms.index(text), q[2])
        return self.mot[w.suspects.index(text)][q[1]]  # "motivated"

    def differ(self, questions: list[tuple]):
        """Literal that forces some answer to differ from the answers in `self.w`."""
        d = self.m.new_bool_var("")
        self.m.add_bool_or([self.answer_is(q, answer(self.w, q)).Not() for q in questions]).only_enforce_if(d)
        return d

    def solve(self, assumptions: list) -> tuple[bool, object]:
        """(True, value-of-literal function) if a night satisfies all assumptions, else (False, None)."""
        solver = self.cp.CpSolver()
        solver.parameters.num_workers = 1  # deterministic
        solver.parameters.random_seed = self.seed
        solver.parameters.max_time_in_seconds = self.max_time_s
        solver.parameters.cp_model_presolve = False  # many small solves: presolve costs more than it saves
        solver.parameters.symmetry_level = 0
        self.m.clear_assumptions()
        self.m.add_assumptions(assumptions)
        status = solver.solve(self.m)
        if status == self.cp.INFEASIBLE:
            return False, None
        if status in (self.cp.OPTIMAL, self.cp.FEASIBLE):
            return True, solver.boolean_value
        raise TimeoutError(f"temporal clue: CP-SAT gave no answer within {self.max_time_s} s")


def check_unique(p: Puzzle, max_time_s: float = 60.0) -> bool:
    """True if the world satisfies the rules and clues, and no other night answers any question differently."""
    if not (valid_world(p.world) and all(holds(p.world, c) for c in p.clues)):
        return False
    sat = SatModel(p.world, max_time_s=max_time_s)
    lits = [sat.clue(c) for c in p.clues]
    if not sat.solve(lits)[0]:
        return False
    return not sat.solve([sat.differ(p.questions)] + lits)[0]


def generate_puzzle(spec: Spec, rng: random.Random, max_time_s: float = 30.0) -> Puzzle:
    """A puzzle whose answers are unique under the rules (proved by CP-SAT), with a minimal clue set."""
    spec.validate()
    w = random_world(spec, rng)
    questions = make_questions(w, spec, rng)
    pool = candidate_clues(w, spec.candidates, rng)
    rng.shuffle(pool)
    sat = SatModel(w, seed=rng.randrange(2**31), max_time_s=max_time_s)
    lits = [sat.clue(c) for c in pool]
    differ = sat.differ(questions)
    chosen: list[int] = []
    while True:
        ok, cex = sat.solve([differ] + [lits[i] for i in chosen])
        if not ok:
            break
        falsified = [i for i in range(len(pool)) if i not in chosen and not cex(lits[i])]
        assert falsified, "basic facts always rule a counterexample out"
        chosen.append(rng.choices(falsified, [CLUE_WEIGHTS[pool[i][0]] for i in falsified])[0])
    for i in list(reversed(chosen)):  # drop clues that are not needed (latest first)
        rest = [j for j in chosen if j != i]
        try:
            if not sat.solve([differ] + [lits[j] for j in rest])[0]:
                chosen = rest
        except TimeoutError:  # undecided: keep the clue
            pass
    clues = [pool[i] for i in chosen]
    rng.shuffle(clues)
    return Puzzle(w, clues, questions)
