"""Facts files: JSON lines ``{"prompt": ..., "answer": ...}`` (other keys are kept, not needed).

The training text of a fact is ``prompt + " " + answer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from memray.errors import InputError


@dataclass(frozen=True)
class Fact:
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def read_facts(path: str | Path) -> list[Fact]:
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"facts file not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read facts file {path}: {exc.strerror}") from None
    facts = []
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{number}: not a JSON object") from None
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("prompt"), str)
                or not isinstance(row.get("answer"), str)
            ):
                raise InputError(f"{path}:{number}: needs string fields 'prompt' and 'answer'")
            if not row["answer"].strip():
                raise InputError(f"{path}:{number}: empty answer")
            meta = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
            facts.append(Fact(row["prompt"], row["answer"], meta))
    if not facts:
        raise InputError(f"facts file {path} holds no facts")
    return facts


def write_facts(path: str | Path, facts: list[Fact]) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for fact in facts:
            handle.write(json.dumps({"prompt": fact.prompt, "answer": fact.answer, **fact.meta}) + "\n")
