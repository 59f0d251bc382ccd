"""Temporal Clue puzzle generator: a random murder night, clues true in it, uniqueness by CP-SAT.

1. `random_world` draws a night: rooms on a grid, suspects and Mr. Boddy walking between
   orthogonally adjacent rooms over the times, weapons carried along by moving suspects, a
   murderer alone with Mr. Boddy and the murder weapon at the murder time, one motive per suspect.
2. `candidate_clues` lists statements that are true in that night (`holds` checks them in Python):
   positions, relative positions, meetings, moves, carried weapons, "or" and "if and only if"
   combinations, plus every basic fact (so that some subset always pins the answers down).
3. `generate_puzzle` asks OR-Tools CP-SAT for a *second* night that satisfies the chosen clues and
   the rules but answers some question differently; a clue that this counterexample violates is
   added, until no such night exists (INFEASIBLE). Clues that are not needed are then removed.

The CP-SAT model encodes the rules as the prompt states them and no more (e.g. it does not assume
that Mr. Boddy's body stays put), so a reader who assumes more still finds the same answers.
This module is the pure-Python part (nights, clue meanings, candidates); the CP-SAT model and
the selection loop are in `thinkrl.tasks.temporal_clue_sat`; text rendering, scoring and the task
are in `thinkrl.tasks.temporal_clue`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

SUSPECTS = ["Miss Scarlet", "Colonel Mustard", "Mrs. White", "Mr. Green", "Mrs. Peacock", "Professor Plum",
            "Madame Rose", "Sgt. Gray", "Monsieur Brunette", "Miss Peach"]
WEAPONS = ["Candlestick", "Knife", "Lead Pipe", "Revolver", "Rope", "Wrench", "Horseshoe", "Poison"]
ROOMS = ["Kitchen", "Ballroom", "Conservatory", "Dining Room", "Billiard Room", "Library", "Lounge", "Hall", "Study",
         "Studio", "Gazebo", "Trophy Room", "Cloak Room", "Courtyard", "Fountain", "Drawing Room", "Carriage House"]
MOTIVES = ["Jealousy", "Ambition", "Power", "Betrayal", "Anger", "Fear", "Greed", "Hatred", "Revenge", "Pride"]
MAIN_QUESTIONS = ("who", "weapon", "where", "when", "why")
DIRS = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
CLUE_WEIGHTS = {"in": 1.0, "same": 2.0, "dir": 2.0, "together": 2.0, "moved": 2.0, "carried": 2.0,
                "or": 3.0, "iff": 3.0, "weapon_is": 1.0, "time_is": 1.0, "motive_is": 1.0}


@dataclass
class Spec:
    """Difficulty knobs. Questions that do not apply (``when`` with one time, ``why`` without motives) are dropped."""

    suspects: int = 3
    weapons: int = 3
    rooms: int = 4
    times: int = 1
    motives: bool = True
    questions: tuple[str, ...] = MAIN_QUESTIONS
    bonus: int = 2  # extra "Where was X at T?" / "Who is motivated by M?" questions
    candidates: int = 150  # random true clues offered to the selection (besides the basic facts)

    def validate(self) -> Spec:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"temporal clue: {what}")

        need(2 <= self.suspects <= len(SUSPECTS), f"suspects must be in [2, {len(SUSPECTS)}], got {self.suspects}")
        need(1 <= self.weapons <= len(WEAPONS), f"weapons must be in [1, {len(WEAPONS)}], got {self.weapons}")
        need(2 <= self.rooms <= len(ROOMS), f"rooms must be in [2, {len(ROOMS)}], got {self.rooms}")
        need(1 <= self.times <= 12, f"times must be in [1, 12], got {self.times}")
        need(0 <= self.bonus <= 10, f"bonus must be in [0, 10], got {self.bonus}")
        bad = [q for q in self.questions if q not in MAIN_QUESTIONS]
        need(not bad and bool(self.questions),
             f"questions must be a non-empty subset of {', '.join(MAIN_QUESTIONS)}, got {list(self.questions)}")
        return self


@dataclass
class World:
    """One night. Person index ``len(suspects)`` is Mr. Boddy; rooms, weapons, motives are indices."""

    suspects: list[str]
    weapons: list[str]
    rooms: list[str]
    times: list[str]
    motives: list[str]  # empty: no motives in this puzzle
    grid: list[list[int | None]]  # grid[row][col] -> room index or None
    pos: list[list[int]]  # pos[person][t]
    wpos: list[list[int]]  # wpos[weapon][t]
    motive: list[int]  # motive[suspect] -> motive index (empty without motives)
    murderer: int
    weapon: int
    mtime: int
    mroom: int = field(init=False)

    def __post_init__(self) -> None:
        self.mroom = self.pos[self.boddy][self.mtime]

    @property
    def boddy(self) -> int:
        return len(self.suspects)

    @property
    def T(self) -> int:
        return len(self.times)

    def cell(self, r: int) -> tuple[int, int]:
        for i, row in enumerate(self.grid):
            if r in row:
                return i, row.index(r)
        raise KeyError(r)

    def neighbor(self, r: int, d: str) -> int | None:
        """The room just `d` (north/south/east/west) of room r, or None."""
        (i, j), (di, dj) = self.cell(r), DIRS[d]
        if 0 <= i + di < len(self.grid) and 0 <= j + dj < len(self.grid[i + di]):
            return self.grid[i + di][j + dj]
        return None

    def adjacent(self, r: int) -> list[int]:
        return [n for d in DIRS if (n := self.neighbor(r, d)) is not None]


# ----------------------------------------------------------------------------- references and clues
# A reference names a person or weapon: ("S", i) suspect, ("B",) Mr. Boddy, ("M",) the murderer,
# ("K", k) the suspect motivated by k, ("W", j) weapon, ("MW",) the murder weapon.
# A clue is a tuple: ("in", X, r, t), ("same", X, Y, t), ("dir", X, d, Y, t) (X just d of Y),
# ("together", X, Y, r), ("moved", X, r1, r2, t), ("carried", X, W, r1, r2, t), ("weapon_is", w),
# ("time_is", t), ("motive_is", s, k), ("or", a, b), ("iff", a, b).


def is_weapon(ref: tuple) -> bool:
    return ref[0] in ("W", "MW")


def resolve(w: World, ref: tuple) -> tuple[str, int]:
    """("p", person index) or ("w", weapon index) that `ref` denotes in world w."""
    kind = ref[0]
    if kind == "S":
        return "p", ref[1]
    if kind == "B":
        return "p", w.boddy
    if kind == "M":
        return "p", w.murderer
    if kind == "K":
        return "p", w.motive.index(ref[1])
    if kind == "W":
        return "w", ref[1]
    return "w", w.weapon


def loc(w: World, ref: tuple, t: int) -> int:
    kind, i = resolve(w, ref)
    return w.pos[i][t] if kind == "p" else w.wpos[i][t]


def holds(w: World, c: tuple) -> bool:
    """Truth of clue c in world w."""
    op = c[0]
    if op == "in":
        return loc(w, c[1], c[3]) == c[2]
    if op == "same":
        return loc(w, c[1], c[3]) == loc(w, c[2], c[3])
    if op == "dir":
        return loc(w, c[1], c[4]) == w.neighbor(loc(w, c[3], c[4]), c[2])
    if op == "together":
        return any(loc(w, c[1], t) == c[3] == loc(w, c[2], t) for t in range(w.T))
    if op == "moved":
        return loc(w, c[1], c[4] - 1) == c[2] and loc(w, c[1], c[4]) == c[3]
    if op == "carried":
        return holds(w, ("moved", c[1], c[3], c[4], c[5])) and holds(w, ("moved", c[2], c[3], c[4], c[5]))
    if op == "weapon_is":
        return w.weapon == c[1]
    if op == "time_is":
        return w.mtime == c[1]
    if op == "motive_is":
        return w.motive[c[1]] == c[2]
    if op == "or":
        return holds(w, c[1]) or holds(w, c[2])
    if op == "iff":
        return holds(w, c[1]) == holds(w, c[2])
    raise ValueError(f"unknown clue {c!r}")


def valid_world(w: World, body_stays: bool = False) -> bool:
    """The rules as the prompt states them (`body_stays`: also Mr. Boddy's body does not move)."""
    S, T = len(w.suspects), w.T
    for t in range(1, T):
        for p in range(S + 1):
            a, b = w.pos[p][t - 1], w.pos[p][t]
            if a != b and b not in w.adjacent(a):
                return False
        for j in range(len(w.weapons)):
            a, b = w.wpos[j][t - 1], w.wpos[j][t]
            if a != b and not (b in w.adjacent(a) and any(w.pos[s][t - 1] == a and w.pos[s][t] == b for s in range(S))):
                return False
    t, r = w.mtime, w.mroom
    alone = [s for s in range(S) if w.pos[s][t] == r] == [w.murderer]
    if not (alone and w.wpos[w.weapon][t] == r):
        return False
    if body_stays and any(w.pos[w.boddy][u] != r for u in range(t, T)):
        return False
    return sorted(w.motive) == list(range(len(w.motives))) if w.motives else not w.motive


def answer(w: World, q: tuple) -> str:
    """The answer text of question q in world w (questions: see `make_questions`)."""
    kind = q[0]
    if kind == "who":
        return w.suspects[w.murderer]
    if kind == "weapon":
        return w.weapons[w.weapon]
    if kind == "where":
        return w.rooms[w.mroom]
    if kind == "when":
        return w.times[w.mtime]
    if kind == "why":
        return w.motives[w.motive[w.murderer]]
    if kind == "loc":
        return w.rooms[loc(w, q[1], q[2])]
    if kind == "motivated":
        return w.suspects[w.motive.index(q[1])]
    raise ValueError(f"unknown question {q!r}")


# ----------------------------------------------------------------------------- random nights


def _times(n: int, rng: random.Random) -> list[str]:
    step = rng.choice([30, 60]) if n > 1 else 60
    start = rng.randrange(18 * 60, 23 * 60 + 1, 30)
    out = []
    for i in range(n):
        m = (start + i * step) % (24 * 60)
        h = m // 60
        out.append(f"{(h % 12) or 12:02d}:{m % 60:02d} {'AM' if h < 12 else 'PM'}")
    return out


def _grid(n: int, rng: random.Random) -> list[list[int | None]]:
    cols = math.ceil(n**0.5)
    if rng.random() < 0.5:
        cols = math.ceil(n / cols)  # the transposed shape
    rows = math.ceil(n / cols)
    return [[i * cols + j if i * cols + j < n else None for j in range(cols)] for i in range(rows)]


def random_world(spec: Spec, rng: random.Random, tries: int = 500) -> World:
    """A random night obeying the rules (Mr. Boddy's body stays where he was killed)."""
    S, W, R, T = spec.suspects, spec.weapons, spec.rooms, spec.times
    names = rng.sample(SUSPECTS, S), rng.sample(WEAPONS, W), rng.sample(ROOMS, R)
    motives = rng.sample(MOTIVES, S) if spec.motives else []
    grid = _grid(R, rng)
    base = World(*names, _times(T, rng), motives, grid, [[0] * T for _ in range(S + 1)], [[0] * T for _ in range(W)],
                 [], 0, 0, 0)
    for _ in range(tries):
        pos = []
        for _p in range(S + 1):
            walk = [rng.randrange(R)]
            for _t in range(1, T):
                adj = base.adjacent(walk[-1])
                walk.append(walk[-1] if rng.random() < 0.4 or not adj else rng.choice(adj))
            pos.append(walk)
        wpos = []
        for _j in range(W):
            walk = [rng.randrange(R)]
            for t in range(1, T):
                movers = [s for s in range(S) if pos[s][t - 1] == walk[-1] != pos[s][t]]
                walk.append(pos[rng.choice(movers)][t] if movers and rng.random() < 0.6 else walk[-1])
            wpos.append(walk)
        chances = [(t, s) for t in range(T) for s in range(S)
                   if [u for u in range(S) if pos[u][t] == pos[S][t]] == [s] and any(wp[t] == pos[S][t] for wp in wpos)]
        if not chances:
            continue
        t, s = rng.choice(chances)
        r = pos[S][t]
        pos[S][t:] = [r] * (T - t)  # the body stays
        weapon = rng.choice([j for j in range(W) if wpos[j][t] == r])
        motive = rng.sample(range(S), S) if spec.motives else []
        w = World(*names, base.times, motives, grid, pos, wpos, motive, s, weapon, t)
        assert valid_world(w, body_stays=True)
        return w
    raise ValueError(f"temporal clue: no night with a murder opportunity found for {spec}; use more rooms or fewer suspects")


# ----------------------------------------------------------------------------- candidate clues


def refs(w: World, weapons: bool = True, boddy: bool = True) -> list[tuple]:
    out = [("S", i) for i in range(len(w.suspects))] + [("M",)]
    out += [("K", k) for k in range(len(w.motives))]
    if boddy:
        out.append(("B",))
    if weapons:
        out += [("W", j) for j in range(len(w.weapons))] + [("MW",)]
    return out


def basic_facts(w: World) -> list[tuple]:
    """Facts that together fix the whole night: every position, the weapon, the time, every motive."""
    out = [("in", x, loc(w, x, t), t) for x in [("S", i) for i in range(len(w.suspects))] + [("B",)]
           + [("W", j) for j in range(len(w.weapons))] for t in range(w.T)]
    out.append(("weapon_is", w.weapon))
    if w.T > 1:
        out.append(("time_is", w.mtime))
    out += [("motive_is", s, w.motive[s]) for s in range(len(w.motive))]
    return out


def _random_true(w: World, kind: str, rng: random.Random) -> tuple | None:
    T, every = w.T, refs(w)
    x, t = rng.choice(every), rng.randrange(T)
    if kind == "in":
        return ("in", x, loc(w, x, t), t)
    if kind == "same":
        ys = [y for y in every if y != x and resolve(w, y) != resolve(w, x) and loc(w, y, t) == loc(w, x, t)]
        return ("same", x, rng.choice(ys), t) if ys else None
    if kind == "dir":
        d = rng.choice(list(DIRS))
        ys = [y for y in every if resolve(w, y) != resolve(w, x) and w.neighbor(loc(w, y, t), d) == loc(w, x, t)]
        return ("dir", x, d, rng.choice(ys), t) if ys else None
    if kind == "together" and T > 1:
        ys = [(y, loc(w, x, u)) for y in every for u in range(T)
              if resolve(w, y) != resolve(w, x) and loc(w, y, u) == loc(w, x, u)]
        if not ys:
            return None
        y, r = rng.choice(ys)
        return ("together", x, y, r)
    if kind == "moved" and T > 1:
        moves = [u for u in range(1, T) if loc(w, x, u - 1) != loc(w, x, u)]
        if is_weapon(x) or not moves:
            return None
        u = rng.choice(moves)
        return ("moved", x, loc(w, x, u - 1), loc(w, x, u), u)
    if kind == "carried" and T > 1:
        weapon = rng.choice([("W", j) for j in range(len(w.weapons))] + [("MW",)])
        moves = [(u, y) for u in range(1, T) if loc(w, weapon, u - 1) != loc(w, weapon, u)
                 for y in refs(w, weapons=False, boddy=False) if holds(w, ("moved", y, loc(w, weapon, u - 1), loc(w, weapon, u), u))]
        if not moves:
            return None
        u, y = rng.choice(moves)
        return ("carried", y, weapon, loc(w, weapon, u - 1), loc(w, weapon, u), u)
    return None


def _random_any(w: World, rng: random.Random) -> tuple:
    """A random (true or false) simple statement."""
    x, t = rng.choice(refs(w)), rng.randrange(w.T)
    if w.T > 1 and not is_weapon(x) and rng.random() < 0.3:
        a = rng.randrange(len(w.rooms))
        nb = w.adjacent(a)
        if nb:
            return ("moved", x, a, rng.choice(nb), rng.randrange(1, w.T))
    return ("in", x, rng.randrange(len(w.rooms)), t)


def candidate_clues(w: World, n: int, rng: random.Random) -> list[tuple]:
    """Basic facts plus up to `n` random true clues of all kinds (no duplicates)."""
    out = dict.fromkeys(basic_facts(w))
    kinds = ["in", "same", "dir", "together", "moved", "carried", "or", "iff"]
    for _ in range(4 * n):
        if len(out) >= n + len(basic_facts(w)):
            break
        kind = rng.choice(kinds)
        if kind == "or":
            a = _random_true(w, rng.choice(["in", "same", "dir", "moved"]), rng)
            c = None if a is None else ("or", *rng.sample([a, _random_any(w, rng)], 2))
        elif kind == "iff":
            a = _random_any(w, rng)
            b = next((b for b in (_random_any(w, rng) for _ in range(30)) if b != a and holds(w, b) == holds(w, a)), None)
            c = None if b is None else ("iff", a, b)
        else:
            c = _random_true(w, kind, rng)
        if c is not None:
            out[c] = None
    clues = list(out)
    assert all(holds(w, c) for c in clues)
    return clues


def make_questions(w: World, spec: Spec, rng: random.Random) -> list[tuple]:
    main = [(q,) for q in spec.questions if not (q == "when" and w.T == 1) and not (q == "why" and not w.motives)]
    pool = [("loc", x, t) for x in [("S", i) for i in range(len(w.suspects))] + [("W", j) for j in range(len(w.weapons))]
            + [("K", k) for k in range(len(w.motives))] for t in range(w.T)]
    pool += [("motivated", k) for k in range(len(w.motives))]
    return main + rng.sample(pool, min(spec.bonus, len(pool)))


@dataclass
class Puzzle:
    world: World
    clues: list[tuple]
    questions: list[tuple]

    @property
    def solution(self) -> list[str]:
        return [answer(self.world, q) for q in self.questions]
