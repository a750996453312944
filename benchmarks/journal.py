"""The comparison's journal: every finished planned run, so that an interrupted comparison resumes.

A comparison (:mod:`benchmarks.compare`) is hundreds of planned runs, hours of them on a small machine.
``runs.partial.jsonl`` in its output folder records, as they finish:

- a header: what the runs depend on (the comparison's settings, the model's fingerprint, the sizes of
  the policy and evaluation tables) and the settings the validation slice chose;
- per planned run ``i``: its scored runs (numbers and per-input predictions and exits, on the
  evaluation split and on dev when that is a second reading), then a ``done`` line. A table-row
  policy (what the wall-clock timing runs) is saved under ``policies/<i>`` before that line.

Started again with the same settings on the same model and tables, the comparison reads the header's
choices instead of tuning again and skips every planned run that has its ``done`` line; a run cut off
mid-write (no ``done``) is run again. A header that differs means other runs: the journal starts over
and says so. Once ``results.json`` is written the journal becomes ``runs.jsonl`` (the policies stay
beside it): every run's per-input outcomes, which ``--rescore`` reads back to recompute the statistics
and pages with no training. It is never resumed by itself, so that a later comparison after a change to
a policy's code does not silently reuse old runs; a comparison that starts afresh in the folder
removes it with the policies.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: what a finished comparison's journal is renamed to (read back only when asked: ``--rescore``)
COMPLETE_NAME = "runs.jsonl"
#: the arrays a run carries per evaluation input (lists in the journal)
_ARRAYS = ("predictions", "exit_layers")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to the journal")


def _same(a: Any, b: Any) -> bool:
    """Equal once both went through JSON (tuples become lists, numpy numbers plain numbers)."""
    return json.loads(json.dumps(a, default=_plain)) == json.loads(json.dumps(b, default=_plain))


@dataclass
class Journal:
    """The journal at ``path`` for the runs that ``key`` describes (see the module docstring)."""

    path: Path
    key: dict[str, Any]
    settings: dict[str, Any] | None = None  # the header's chosen settings, when resuming
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)  # plan index -> runs, policy
    note: str = ""  # what opening found, for the log

    @classmethod
    def open(cls, path: str | Path, key: dict[str, Any], start_over: bool = True) -> Journal:
        """Read the journal at ``path`` if its header matches ``key``, else start a new one there
        (``start_over`` False: ValueError instead, the file left as it is)."""
        journal = cls(Path(path), json.loads(json.dumps(key, default=_plain)))
        if not journal.path.is_file():
            return journal
        lines = journal.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if not _same(header.get("key"), journal.key):
            if not start_over:
                raise ValueError(f"{journal.path} was made with other settings, model or tables")
            journal.note = f"{journal.path} was made with other settings, model or tables: starting over"
            journal._clear()
            return journal
        journal.settings = header.get("settings")
        pending: dict[int, list[dict[str, Any]]] = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run cut off mid-write
                continue
            if "done" in entry:
                index = int(entry["done"])
                journal.finished[index] = {"runs": pending.pop(index, []), "policy": entry.get("policy")}
            else:
                pending.setdefault(int(entry["item"]), []).append(entry["run"])
        journal.note = f"{journal.path}: resuming after {len(journal.finished)} finished planned runs"
        return journal

    def start(self, settings: dict[str, Any]) -> None:
        """Write the header (a new journal), or keep the one read."""
        if self.settings is not None:
            return
        self._clear()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.settings = json.loads(json.dumps(settings, default=_plain))
        self._append({"key": self.key, "settings": self.settings})

    def done(self, index: int) -> dict[str, Any] | None:
        """The journal's record of planned run ``index`` ({"runs": [...], "policy": folder or None})."""
        return self.finished.get(index)

    def record(self, index: int, runs: list[dict[str, Any]], policy: Any = None) -> None:
        """Planned run ``index`` finished: its runs (dicts with the per-input arrays) and, for a
        table row, its policy (saved under ``policies/<index>``)."""
        for run in runs:
            self._append({"item": index, "run": run})
        folder = None
        if policy is not None:
            folder = self.policies / str(index)
            if folder.exists():
                shutil.rmtree(folder)
            policy.save(folder)
            folder = str(folder.relative_to(self.path.parent))
        self._append({"done": index, "policy": folder})

    @property
    def policies(self) -> Path:
        return self.path.parent / "policies"

    def finish(self) -> None:
        """The comparison finished: the journal becomes :data:`COMPLETE_NAME` beside it (replacing an
        older one), the policies stay, and nothing resumes from it unless asked."""
        if self.path.is_file():
            self.path.replace(self.path.with_name(COMPLETE_NAME))
        self.finished.clear()

    def _append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry, default=_plain) + "\n")

    def _clear(self) -> None:
        self.path.unlink(missing_ok=True)
        # a finished comparison's runs go with its policies: a new start replaces both
        self.path.with_name(COMPLETE_NAME).unlink(missing_ok=True)
        shutil.rmtree(self.policies, ignore_errors=True)
        self.finished.clear()
