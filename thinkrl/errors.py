"""Faults that stop a run with one line for the user (the CLI prints the message, no traceback, exit 2).

Bad input is a ValueError (ConfigError, DataError, ModelLoadError: the file:line, field or path); a fault met
while running is a `RunFault`: too many bad optimizer steps in a row (thinkrl.train.engine.NumericalFault), the
engine process gone (thinkrl.rollout.process.EngineProcessError), an output directory that cannot be written
(thinkrl.system.checkpoint.OutputDirError). What the run wrote before (metrics, checkpoints) stays as it was.
"""


class RunFault(RuntimeError):
    """A fault that stops a run; the message is one line naming the step, process or path."""
