"""The privacy ledger: every DP step spent on one dataset, by any client, kept where all of them see it.

The spent budget belongs to the data, not to a client or a checkpoint. A ledger is keyed by (tenant,
``DPConfig.dataset_id``; default one per tenant) and holds the accountant history of every step taken on
that data: (noise multiplier, sample rate, steps). Epsilon is composed over all of it. A step is checked
against the budget and recorded under one exclusive lock, before any weight changes, so two clients
spending the same budget at once cannot both pass it; nothing ever removes an entry, so a reload, a new
client or a restart cannot lower it.

Locally (and in a trainer pod) the ledger is an append-only JSON-lines file in the trainer's home
(``privacy/<tenant>/_<pseudonym>.jsonl``: the file name is an HMAC of the dataset id under the tenant's names
key, so the folder does not list the tenant's dataset ids, and the client on each line is sealed; a file
named in clear by an earlier version is renamed on first open), one line per step, fsynced before the step's weights change, under ``flock``. A line torn by a crash is a
step whose weights never changed: it is dropped when the next step is recorded. Its lines are chained
(SHA-256 over the previous head and the line): a checkpoint records the head it was saved at, and loads only
over a ledger that still begins with those lines, so a ledger rolled back and then refilled by other steps
is refused although its step counts are back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

from tg_tinker.config import DPConfig
from tg_tinker.errors import TrainingClientError, ValidationError

from tensafe_keys.private_files import fsync_dir, private_dir
from tensafe_trainer.storage.crypto import pseudonym, seal_id
from tensafe_keys.store import KeyProvider
from tg_tinker.types import check_tenant

History = tuple[tuple[float, float, int], ...]  # ((noise multiplier, sample rate, steps), ...)
TENANT_LEDGER = "_tenant"  # the ledger of a tenant's DP steps that name no dataset
DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_dataset_id(dataset_id: str) -> str:
    if not isinstance(dataset_id, str) or not DATASET_ID.match(dataset_id):
        raise ValidationError(f"invalid dataset id {dataset_id!r}: letters, digits, '_', '.', '-', at most 64",
                              {"field": "dataset_id"})
    return dataset_id


STEP_FIELDS = {"noise_multiplier", "sample_rate", "steps", "group_size", "client", "time"}
BUDGET_FIELDS = {"epsilon_budget", "delta", "client"}


def _corrupt(path: Path, number: int, why: str) -> TrainingClientError:
    return TrainingClientError(f"the privacy ledger {path.name} holds an invalid entry at line {number} ({why}): it "
                               "was edited; no DP step is taken on it until it is restored", {"ledger_line": number})


def _parse(line: bytes, path: Path, number: int) -> dict:
    """One ledger line, checked: a step or the data's budget, every number in its range. A line that is neither
    makes the whole ledger unreadable (an edited ledger is refused, never read around)."""
    try:
        entry = json.loads(line)
    except ValueError:
        raise _corrupt(path, number, "not JSON") from None
    if not isinstance(entry, dict):
        raise _corrupt(path, number, "not an object")

    def number_in(name: str, low: float, high: float, low_open: bool = True) -> bool:
        value = entry.get(name)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (value > low if low_open else value >= low) and value <= high

    def whole(name: str, default=None) -> bool:
        value = entry.get(name, default)
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if "epsilon_budget" in entry:
        ok = set(entry) <= BUDGET_FIELDS and number_in("epsilon_budget", 0, math.inf) and number_in("delta", 0, 1)
    else:
        ok = set(entry) <= STEP_FIELDS and number_in("noise_multiplier", 0, math.inf, low_open=False) and \
            number_in("sample_rate", 0, 1) and whole("steps") and whole("group_size", 1)
    if not ok:
        raise _corrupt(path, number, "not a step or a budget with values in range")
    return entry


def check_unit(data_unit: int | None, spender_unit: int, dataset_id: str | None) -> None:
    if data_unit is not None and data_unit != spender_unit:
        name = f"dataset {dataset_id!r}" if dataset_id else "this tenant's data"
        raise ValidationError(
            f"the privacy ledger of {name} counts steps in units of {data_unit} row(s) (group_size); a client with "
            f"group_size {spender_unit} cannot spend on it: steps clipped per different units do not compose into "
            "an epsilon for either. Use another dataset_id", {"field": "dp_config.group_size"})


def _chain_start() -> bytes:
    return bytes(32)


def _chained(chain: bytes, line: bytes) -> bytes:
    return hashlib.sha256(chain + line).digest()


def _merge(history: list[list], sigma: float, q: float, steps: int) -> None:
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1][2] += steps
    else:
        history.append([sigma, q, steps])


def open_ledger(root: Path, tenant_id: str, cfg: DPConfig, keys: KeyProvider):
    """The ledger of the data ``cfg`` trains on: a PrivacyBudget in the API in a trainer pod the operator set up
    for it (``TENSAFE_LEDGER=kubernetes``), else a file under ``root``."""
    if os.environ.get("TENSAFE_LEDGER") == "kubernetes":
        from tensafe_trainer.privacy.ledger_kubernetes import KubernetesLedger
        from tensafe_trainer.privacy.dp import epsilon_of

        return KubernetesLedger.from_environment(
            tenant_id, cfg.dataset_id, cfg.accountant_type,
            lambda history, delta: epsilon_of(cfg.accountant_type, delta, history))
    return PrivacyLedger(root, tenant_id, cfg.dataset_id, keys=keys)


class PrivacyLedger:
    """One dataset's ledger file. Safe across the engine processes of a trainer (and across trainers that
    share the folder): reads take what is fully written, spending holds an exclusive lock."""

    def __init__(self, root: Path, tenant_id: str, dataset_id: str | None, *, keys: KeyProvider):
        """``keys``: the key store, which names the file (the tenant's names key) and keeps its head."""
        self.tenant_id = check_tenant(tenant_id)
        self.dataset_id, self.keys = dataset_id, keys
        self.names_key = keys.names_key(self.tenant_id)
        name = TENANT_LEDGER if dataset_id is None else check_dataset_id(dataset_id)
        folder = Path(root) / self.tenant_id
        private_dir(folder.parent)
        private_dir(folder)
        self._name = pseudonym(self.names_key, "ledger", name)
        # "_" first: no dataset id starts so, so no clear name (below) is ever another ledger's pseudonym
        self.path = folder / f"_{self._name}.jsonl"
        clear = folder / f"{name}.jsonl"  # the name an earlier version gave it
        if clear.exists():
            if self.path.exists():
                raise TrainingClientError(f"two ledgers of one dataset in {folder}: {clear.name} (named before ids "
                                          f"were pseudonymised) and {self.path.name}; merge them by hand (spent "
                                          "budget must not be lost)", {"dataset_id": dataset_id})
            os.rename(clear, self.path)
            fsync_dir(folder)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            fsync_dir(folder)
        self._offset = 0  # bytes of the file already parsed into _history
        self._history: list[list] = []
        self._group_size: int | None = None  # the data's privacy unit: rows per group, set by its first step
        self._lines, self._chain = 0, _chain_start()
        self._checked_lines = 0  # the key store's recorded head is known to be covered up to here

    def _check_recorded(self) -> None:
        """The ledger still holds what the key store recorded of it (its head after the last step any trainer
        wrote): one emptied, rolled back, replaced or renamed away would give spent budget back."""
        recorded = self.keys.ledger_head(self.tenant_id, self._name)
        if recorded is None or recorded["lines"] <= self._checked_lines:
            return
        if recorded["lines"] > self._lines or not self.covers(recorded):
            raise TrainingClientError(
                f"the privacy ledger {self.path} holds {self._lines} lines where the key store recorded "
                f"{recorded['lines']}, or other ones: it was rolled back, replaced or removed, and spent budget is "
                "never given back; restore it (no DP step runs on this data until then)",
                {"dataset_id": self.dataset_id})
        self._checked_lines = recorded["lines"]

    def _read_new(self, f) -> None:
        """Parse the complete lines written since the last read (a torn last line is not a step). All or nothing:
        an invalid line leaves what was read before untouched, and raises."""
        f.seek(self._offset)
        data = f.read()
        end = data.rfind(b"\n") + 1
        history, unit = [list(h) for h in self._history], self._group_size
        lines, chain = self._lines, self._chain
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            lines, chain = lines + 1, _chained(chain, line)
            entry = _parse(line, self.path, lines)
            if "epsilon_budget" in entry:  # for the reader; the key store's head is the budget (budget())
                continue
            if unit not in (None, entry.get("group_size", 1)):
                raise _corrupt(self.path, lines, f"group_size {entry.get('group_size', 1)} beside {unit}")
            unit = entry.get("group_size", 1)
            _merge(history, float(entry["noise_multiplier"]), float(entry["sample_rate"]), entry["steps"])
        self._history, self._group_size = history, unit
        self._lines, self._chain = lines, chain
        self._offset += end

    def history(self) -> History:
        with open(self.path, "rb") as f:
            self._read_new(f)
        self._check_recorded()
        return tuple((s, q, n) for s, q, n in self._history)

    def budget(self) -> tuple[float, float] | None:
        """(epsilon, delta): the data's budget, set once by the first client that spent with a target, as the key
        store's head records it: a budget line written into the file by whoever can write the home sets nothing
        (nor does one in a ledger from before the key store kept heads: its next target sets it)."""
        recorded = self.keys.ledger_head(self.tenant_id, self._name)
        return tuple(recorded["budget"]) if recorded and recorded.get("budget") else None

    def head(self) -> dict:
        """Where the ledger stands: its complete lines and their chained SHA-256 (a checkpoint keeps it)."""
        self.history()
        return {"lines": self._lines, "sha256": self._chain.hex()}

    def covers(self, head: dict) -> bool:
        """Whether this ledger still begins with the lines ``head`` was taken over (it only ever grows)."""
        lines, chain = 0, _chain_start()
        with open(self.path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n") or lines == head["lines"]:
                    break
                if line.strip():
                    lines, chain = lines + 1, _chained(chain, line.rstrip(b"\n"))
        return lines == head["lines"] and chain.hex() == head["sha256"]

    def spend(self, noise_multiplier: float, sample_rate: float, check: Callable[[History, History], None],
              client_id: str = "", budget: tuple[float, float] | None = None,
              group_size: int = 1) -> tuple[History, History]:
        """Record one step, unless ``check(history before, history after)`` raises: both under the lock.
        ``budget``: the spender's (target epsilon, delta), which becomes the data's if it has none yet.
        ``group_size``: the spender's privacy unit, which must be the data's (steps of two units do not compose
        into an epsilon for either). Returns (before, after)."""
        with open(self.path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                self._read_new(f)
                self._check_recorded()
                check_unit(self._group_size, group_size, self.dataset_id)
                before = tuple((s, q, n) for s, q, n in self._history)
                after_list = [list(h) for h in self._history]
                _merge(after_list, noise_multiplier, sample_rate, 1)
                after = tuple((s, q, n) for s, q, n in after_list)
                check(before, after)
                f.truncate(self._offset)  # drop a line torn by a crash (its step never changed weights)
                f.seek(self._offset)
                client_id = seal_id(self.names_key, self.tenant_id, client_id) if client_id else client_id
                line = json.dumps({"noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": 1,
                                   "group_size": group_size, "client": client_id, "time": time.time()},
                                  sort_keys=True).encode() + b"\n"
                data_budget = self.budget()
                if data_budget is None and budget is not None:  # the first target on this data becomes its budget
                    line = json.dumps({"epsilon_budget": budget[0], "delta": budget[1], "client": client_id},
                                      sort_keys=True).encode() + b"\n" + line
                    data_budget = budget
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
                self._offset += len(line)
                self._history, self._group_size = after_list, group_size
                for written in line.splitlines():
                    self._lines, self._chain = self._lines + 1, _chained(self._chain, written)
                # Under the lock, after the line is durable: the key store's head never runs ahead of the file.
                self.keys.put_ledger_head(self.tenant_id, self._name, {
                    "lines": self._lines, "sha256": self._chain.hex(),
                    "budget": list(data_budget) if data_budget is not None else None})
                self._checked_lines = self._lines
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return before, after

