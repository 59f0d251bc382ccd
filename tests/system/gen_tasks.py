"""Tasks for the generate / pairs tests: the arithmetic problems with a reward that a fresh model meets on
about half its answers (an even-length answer), and one without a verifier."""
from thinkrl.tasks.arithmetic import Arithmetic
from thinkrl.tasks.base import Task


class EvenLength(Arithmetic):
    reward_isolation = "inline"

    def reward(self, response, sample):
        return 1.0 if len(response) % 2 == 0 else 0.0


class Unscored(Arithmetic):
    reward = Task.reward  # no verifier
