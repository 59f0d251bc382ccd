"""Tasks: one module per task (prompt builder + reward), registered by name."""
from thinkrl.tasks.base import TASKS, FunctionTask, Task, make_task, register_task  # noqa: F401

_BUILTIN = ["arithmetic", "math", "countdown", "temporal_clue", "code", "calculator"]


def _load_builtin() -> None:
    import importlib

    for mod in _BUILTIN:
        try:
            importlib.import_module(f"thinkrl.tasks.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"thinkrl.tasks.{mod}":  # a missing optional dependency is reported on use
                continue


def registered_tasks() -> list[str]:
    _load_builtin()
    return sorted(TASKS)
