"""Load dataset files into `Sample`s, split and shuffle them with a seed.

Formats (chosen by the path): ``.jsonl`` (one JSON object a line), ``.json`` (a list of objects,
or an object whose only field is that list), ``.parquet`` (needs ``pyarrow``), and a directory
written by Hugging Face ``datasets`` (``Dataset.save_to_disk``; needs ``datasets``, imported only then).

Fields are mapped by name (`DataConfig.prompt_field`, `answer_field`, `id_field`); a dotted path
reaches into nested objects and lists (``"meta.question"``, ``"messages.0.content"``). An empty
`prompt_field` or `answer_field` means the task builds the prompt / finds the answer itself (from
``sample.meta["row"]``, the whole raw row). A malformed row stops loading with a one-line error
naming the place and the field: ``data/train.jsonl:7: field 'answer' missing``.

    samples = load_samples("gsm8k.jsonl", prompt_field="question", answer_field="answer")
    train, held_out = split_samples(samples, eval_fraction=0.1, seed=0)
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

from thinkrl.types import Sample

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_MISSING = object()


class DataError(ValueError):
    """A problem with a data file; the message is one line naming the file, row and field."""


def fixture_path(name: str) -> Path:
    """Path of a bundled public data sample, e.g. ``fixture_path("gsm8k_test_sample.jsonl")``."""
    p = FIXTURES / name
    if not p.exists():
        have = ", ".join(sorted(str(f.relative_to(FIXTURES)) for f in FIXTURES.rglob("*") if f.is_file()))
        raise DataError(f"no bundled data file {name!r}; have: {have}")
    return p


def get_field(row: Any, path: str, default: Any = _MISSING) -> Any:
    """``row["a"]["b"]`` for ``path="a.b"`` (integers index lists). Raises KeyError(path) if absent."""
    cur = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            if default is not _MISSING:
                return default
            raise KeyError(path)
    return cur


# ----------------------------------------------------------------------------- reading rows


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as e:  # unreadable (permissions), a broken link, ...
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


def _decode(path: Path, raw: bytes, line: int = 1) -> str:
    """`raw` (the file from `line` on) as text; a byte that is not UTF-8 is a DataError naming its line."""
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")  # a byte-order mark at the start is fine
    except UnicodeDecodeError as e:
        at = line + raw.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{at}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r})") from None


def iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line, row) of each non-blank line; DataError naming file:line for bad JSON, non-UTF-8 or too deep."""
    with _open(path) as f:
        for i, raw in enumerate(f, 1):
            line = _decode(path, raw, i)
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{i}: JSON nested too deeply") from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    with _open(path) as f:
        text = _decode(path, f.read())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}:[{i}]", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}:[{i}]", row


def _iter_hf_dir(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a directory is read as a Hugging Face dataset, which needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise DataError(f"{path}: holds splits {', '.join(splits)}; point at one, e.g. {path / splits[0]}")
        ds = ds[splits[0]]
    for i, row in enumerate(ds):
        yield f"{path}:[{i}]", row


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` pairs; `where` is ``file:line`` (JSONL) or ``file:[index]``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if p.is_dir():
        return _iter_hf_dir(p)
    suffix = p.suffix.lower()
    readers = {".jsonl": iter_jsonl, ".ndjson": iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}
    if suffix not in readers:
        raise DataError(f"{p}: unknown data format {suffix!r}; use .jsonl, .json, .parquet or a datasets directory")
    return readers[suffix](p)


# ----------------------------------------------------------------------------- rows -> samples


def _check_prompt(where: str, field: str, prompt: Any) -> list[dict] | str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return [dict(m) for m in prompt]
    raise DataError(f"{where}: field {field!r} must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}")


def row_to_sample(where: str, row: Any, prompt_field: str, answer_field: str, id_field: str = "", default_id: str = "") -> Sample:
    """One raw row -> Sample (raises DataError naming `where` and the field)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")

    def field(name: str) -> Any:
        try:
            return get_field(row, name)
        except KeyError:
            raise DataError(f"{where}: field {name!r} missing") from None

    prompt = _check_prompt(where, prompt_field, field(prompt_field)) if prompt_field else ""
    answer = field(answer_field) if answer_field else None
    if id_field:
        sid = field(id_field)
        if not isinstance(sid, (str, int)) or isinstance(sid, bool):
            raise DataError(f"{where}: field {id_field!r} must be a string or an integer, got {type(sid).__name__}")
        sid = str(sid)
    else:
        sid = default_id
    return Sample(id=sid, prompt=prompt, answer=answer, meta={"source": where, "row": row})


def load_samples(path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer",
                 id_field: str = "", limit: int | None = None) -> list[Sample]:
    """Read a dataset file (or HF dataset directory) into Samples, in file order.

    Ids come from `id_field`, else ``<file stem>-<row index>``; duplicate ids are an error.
    `limit` keeps the first `limit` rows.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    stem = Path(path).stem
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for i, (where, row) in enumerate(iter_rows(path)):
        if limit is not None and len(samples) >= limit:
            break
        s = row_to_sample(where, row, prompt_field, answer_field, id_field, default_id=f"{stem}-{i}")
        if s.id in seen:
            raise DataError(f"{where}: duplicate id {s.id!r} (first at {seen[s.id]})")
        seen[s.id] = where
        samples.append(s)
    if not samples and limit != 0:
        raise DataError(f"{path}: no rows")
    return samples


# ----------------------------------------------------------------------------- order and splits


def shuffle_samples(samples: list[Sample], seed: int) -> list[Sample]:
    """A shuffled copy; the same seed gives the same order."""
    out = list(samples)
    random.Random(f"shuffle-{seed}").shuffle(out)
    return out


def split_samples(samples: list[Sample], eval_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Shuffle with `seed`, then hold out ``round(n * eval_fraction)`` samples (at least 1) for eval.

    Both parts keep at least one sample; raises DataError when that is impossible.
    """
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(samples)
    if n < 2:
        raise DataError(f"need at least 2 samples to split off an eval set, got {n}")
    k = min(max(1, round(n * eval_fraction)), n - 1)
    order = shuffle_samples(samples, seed)
    return order[k:], order[:k]


def load_splits(data_cfg, task, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, eval) for a `DataConfig`: files when given, else the task's generator.

    Files (read as `data_cfg.format`, thinkrl.data.formats): `train_path` (+ `eval_path`, or a held-out
    `eval_fraction`), shuffled with `seed` when `data_cfg.shuffle`. Generated: ``num_train`` samples from seed
    `seed` and ``num_eval`` from a different seed, with eval prompts that also occur in train removed.
    """
    from thinkrl.data.formats import load_formatted  # the standard math sets (data.format)

    if data_cfg.train_path:
        train = load_formatted(data_cfg.train_path, data_cfg)
        if data_cfg.eval_path:
            held = load_formatted(data_cfg.eval_path, data_cfg)
            if data_cfg.shuffle:
                train = shuffle_samples(train, seed)
        else:
            file_order = {id(s): i for i, s in enumerate(train)}
            train, held = split_samples(train, data_cfg.eval_fraction, seed)
            if not data_cfg.shuffle:  # the held-out set is still random; keep file order within each part
                train.sort(key=lambda s: file_order[id(s)])
                held.sort(key=lambda s: file_order[id(s)])
        return train, held
    if not task.can_generate:
        raise DataError(f"task {task.name!r} has no generator; set data.train_path")
    train = task.generate(data_cfg.num_train, seed)
    seen = {json.dumps(s.prompt, sort_keys=True) for s in train}
    held = [s for s in task.generate(data_cfg.num_eval, seed + 1_000_003) if json.dumps(s.prompt, sort_keys=True) not in seen]
    if not held:
        raise DataError(f"task {task.name!r}: every generated eval problem also occurs in train; raise the task's difficulty range")
    return train, held
