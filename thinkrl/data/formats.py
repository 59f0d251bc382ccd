"""The public math sets in their published formats (`data.format`), read from files the user gives.

    gsm8k    ``question``, ``answer`` ending in ``#### <n>`` (openai/grade-school-math): the gold answer is ``<n>``,
             the worked solution goes to ``sample.meta["solution"]``
    math500  ``problem``, ``answer`` (LaTeX), ``solution``, ``unique_id`` (the PRM800K 500-problem split of MATH)
    aime     ``problem``, ``answer`` (an integer), ``id`` when present (the Hugging Face AIME exports; the
             capitalised ``Problem`` / ``Answer`` / ``ID`` of some exports too)
    auto     the field mapping ``data.prompt_field`` / ``answer_field`` / ``id_field`` when the first row has
             ``data.prompt_field``, else the set above whose fields the first row has

    samples = load_formatted("aime_2024.jsonl", data_cfg)     # data_cfg.format: auto | gsm8k | math500 | aime
    samples = load_format("gsm8k_test.jsonl", "gsm8k", limit=100)

A bad row stops loading with one line naming file:line and the field (``test.jsonl:7: field 'answer' has no
'#### <answer>' (GSM8K format)``). `tests/data/test_formats.py` reads the bundled samples
(`fixtures/gsm8k_test_sample.jsonl`, `fixtures/math500_sample.jsonl`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from thinkrl.data.datasets import DataError, iter_rows, load_samples
from thinkrl.types import Sample


@dataclass(frozen=True)
class Format:
    prompt_field: str
    answer_field: str
    id_field: str = ""


FORMATS = ("auto", "gsm8k", "math500", "aime")  # the choices of data.format


def _detect(row: dict, where: str) -> tuple[str, Format]:
    keys = set(row) if isinstance(row, dict) else set()
    if {"question", "answer"} <= keys:
        return "gsm8k", Format("question", "answer")
    if {"problem", "answer"} <= keys:
        if "unique_id" in keys:
            return "math500", Format("problem", "answer", "unique_id")
        return "aime", Format("problem", "answer", "id" if "id" in keys else "")
    if {"Problem", "Answer"} <= keys:
        return "aime", Format("Problem", "Answer", "ID" if "ID" in keys else "")
    raise DataError(f"{where}: fields {', '.join(sorted(keys)) or '(none)'} match no known format (gsm8k: question, "
                    "answer; math500: problem, answer, unique_id; aime: problem, answer); set data.prompt_field "
                    "and data.answer_field")


def _resolve(path: str | Path, name: str, fields: Format | None) -> tuple[str, Format]:
    """(format name, field mapping) of a file read as format `name` (see the module docstring)."""
    if name not in FORMATS:
        raise DataError(f"data.format: unknown value {name!r}; valid: {', '.join(FORMATS)}")
    where, first = next(iter(iter_rows(path)), (str(path), None))
    if name == "auto" and fields is not None and isinstance(first, dict) and fields.prompt_field in first:
        return "fields", fields
    found, fmt = _detect(first, where)
    if name != "auto" and found != name and not {found, name} <= {"math500", "aime"}:
        raise DataError(f"{where}: data.format={name} but the row's fields are {found}'s")
    return (name if name != "auto" else found), fmt


def load_format(path: str | Path, name: str, limit: int | None = None, fields: Format | None = None) -> list[Sample]:
    """Samples of a data file in format `name` (auto | gsm8k | math500 | aime; `fields`: the mapping auto uses
    when the first row has its prompt field)."""
    name, fmt = _resolve(path, name, fields)
    samples = load_samples(path, prompt_field=fmt.prompt_field, answer_field=fmt.answer_field, id_field=fmt.id_field,
                           limit=limit)
    if name == "fields":
        return samples
    for s in samples:
        where = s.meta["source"]
        if s.answer is None or isinstance(s.answer, (dict, list)) or str(s.answer).strip() == "":
            raise DataError(f"{where}: field {fmt.answer_field!r} is empty or not a number / string")
        if name == "gsm8k":
            text = str(s.answer)
            if "####" not in text:
                raise DataError(f"{where}: field 'answer' has no '#### <answer>' (GSM8K format)")
            s.meta["solution"] = text
            s.answer = text.rsplit("####", 1)[1].strip()
        else:
            s.answer = str(s.answer).strip()
    return samples


def load_formatted(path: str | Path, data_cfg, limit: int | None = None) -> list[Sample]:
    """Samples of a data file under `data_cfg.format` (a standard math set, or the configured field mapping)."""
    fields = Format(data_cfg.prompt_field, data_cfg.answer_field, data_cfg.id_field)
    return load_format(path, data_cfg.format, limit, fields)
