"""The privacy ledger on Kubernetes: a ``PrivacyBudget`` custom resource every trainer pod on the data sees.

Same contract as :class:`~tensafe_trainer.privacy.ledger.PrivacyLedger` (``history()``, ``spend()``), kept in the
API instead of a file, so two TrainingClients (two pods, two volumes) on one dataset compose into one
epsilon. A trainer reserves steps in chunks so the API sees one write per ``chunk`` steps, not one per
step: a reservation is checked against the budget (the client's ``target_epsilon`` and the resource's
``spec.epsilonBudget``) and written with the resourceVersion it was computed from (optimistic
concurrency: a 409 means another trainer wrote first, so it is recomputed). Reserved steps count as
spent, in the resource and for everyone else, the moment they are reserved; steps a trainer reserved and
never took (it stopped) stay counted. Nothing lowers the record: the CRD refuses a shorter history or
fewer steps, and trainers' RBAC only lets them patch their own budget's status.

The operator creates the resource; the trainer pod's service account may only read it and patch its
status (builders.py).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional

from tg_tinker.errors import DPBudgetExceededError, TrainingClientError
from tg_tinker.resources import GROUP, PRIVACY_BUDGETS, VERSION

from tensafe_trainer.privacy.ledger import History, check_unit

DEFAULT_CHUNK = 16
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_CONFLICTS = 20
REFRESH_S = 1.0
REQUEST_TIMEOUT_S = 10.0


def _history(obj: dict) -> list[list]:
    return [[float(h["noiseMultiplier"]), float(h["sampleRate"]), int(h["steps"])]
            for h in (obj.get("status") or {}).get("history") or []]


def _with(history: list[list], sigma: float, q: float, steps: int) -> list[list]:
    """``steps`` more at (sigma, q): one entry per (sigma, q), the resource's list-map key."""
    out = [list(h) for h in history]
    for entry in out:
        if entry[0] == sigma and entry[1] == q:
            entry[2] += steps
            return out
    out.append([sigma, q, steps])
    return out


def _frozen(history: list[list]) -> History:
    return tuple((s, q, n) for s, q, n in history if n > 0)


class KubernetesLedger:
    """``epsilon_fn(history, delta)``: the accountant's epsilon (to enforce ``spec.epsilonBudget`` and to
    write ``status.epsilon`` for ``kubectl get pb``)."""

    def __init__(self, api: Any, namespace: str, name: str, tenant_id: str, dataset_id: Optional[str],
                 epsilon_fn: Callable[[History, float], float], accountant: str, chunk: int = DEFAULT_CHUNK):
        self.api, self.namespace, self.name = api, namespace, name
        self.tenant_id, self.dataset_id = tenant_id, dataset_id
        self._epsilon, self._accountant, self.chunk = epsilon_fn, accountant, max(1, chunk)
        self._reserved = 0  # steps this trainer reserved and has not taken yet
        self._reserved_at: Optional[tuple[float, float]] = None
        self._seen: list[list] = []  # the resource's history as last read or written
        self._spec: dict = {}
        self._seen_at = -math.inf

    @classmethod
    def from_environment(cls, tenant_id: str, dataset_id: Optional[str], mechanism: str,
                         epsilon_fn: Callable[[History, float], float]) -> "KubernetesLedger":
        """In a trainer pod: the service account's credentials, the budget named by the operator."""
        from kubernetes import client
        from kubernetes.config.incluster_config import InClusterConfigLoader

        folder = os.environ.get("TENSAFE_SERVICEACCOUNT_DIR", SERVICEACCOUNT_DIR)
        configuration = client.Configuration()
        InClusterConfigLoader(f"{folder}/token", f"{folder}/ca.crt").load_and_set(configuration)
        api = client.CustomObjectsApi(client.ApiClient(configuration))
        return cls(api, os.environ["TENSAFE_LEDGER_NAMESPACE"],
                   os.environ["TENSAFE_LEDGER_NAME"], tenant_id, dataset_id, epsilon_fn, mechanism,
                   int(os.environ.get("TENSAFE_LEDGER_CHUNK", DEFAULT_CHUNK)))

    def _get(self) -> dict:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            obj = self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PRIVACY_BUDGETS, self.name,
                                                        _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as error:
            raise TrainingClientError(f"cannot read PrivacyBudget {self.namespace}/{self.name} (HTTP {error.status}); "
                                      "no DP step is taken without its ledger", {"privacy_budget": self.name}) from None
        except (HTTPError, OSError) as error:  # connection errors and timeouts
            raise TrainingClientError(f"cannot reach the API for PrivacyBudget {self.namespace}/{self.name} ({error}); "
                                      "no DP step is taken without its ledger", {"privacy_budget": self.name}) from None
        spec = obj.get("spec") or {}
        if spec.get("tenantId") != self.tenant_id or spec.get("datasetId") != self.dataset_id:
            raise TrainingClientError(f"PrivacyBudget {self.name} is the ledger of ({spec.get('tenantId')!r}, "
                                      f"{spec.get('datasetId')!r}), not of ({self.tenant_id!r}, {self.dataset_id!r})")
        self._spec = spec
        return obj

    def _view(self, history: list[list]) -> History:
        """The resource's history less this trainer's own unused reservation (others' reservations stay)."""
        out = [list(h) for h in history]
        left = self._reserved
        for entry in reversed(out):
            if left and self._reserved_at == (entry[0], entry[1]):
                taken = min(left, entry[2])
                entry[2] -= taken
                left -= taken
        return _frozen(out)

    def history(self) -> History:
        """Read again at most once a second (the trainer asks after every operation). While the API cannot be
        reached, what was last seen (a report only: a step is taken only from a reservation written to the resource)."""
        if time.monotonic() - self._seen_at > REFRESH_S:
            try:
                self._remember(_history(self._get()))
            except TrainingClientError:
                if self._seen_at == -math.inf:
                    raise  # never read: no number to report
        return self._view(self._seen)

    def _remember(self, history: list[list]) -> None:
        self._seen, self._seen_at = history, time.monotonic()

    def head(self) -> None:
        """No chain here: the API itself refuses a lowered record (the CRD's rules)."""
        return None

    def covers(self, head: dict) -> bool:
        """A chain head is a file ledger's: this ledger holds another record, which cannot vouch for it."""
        return False

    def budget(self) -> Optional[tuple[float, float]]:
        """(epsilonBudget, delta) of the resource as last read: set by the operator from the first client."""
        spec = self._spec
        if spec.get("epsilonBudget") is None or spec.get("delta") is None:
            return None
        return float(spec["epsilonBudget"]), float(spec["delta"])

    def spend(self, noise_multiplier: float, sample_rate: float, check: Callable[[History, History], None],
              client_id: str = "", budget: Optional[tuple[float, float]] = None,
              group_size: int = 1) -> tuple[History, History]:
        """``budget`` is not written: the operator set the resource's from the first client's config.
        ``group_size``: the spender's privacy unit, which must be the data's (``status.groupSize``)."""
        if self._reserved and self._reserved_at == (noise_multiplier, sample_rate):
            before = self._view(self._seen)  # no API call: the step was checked when it was reserved
            after = _frozen(_with([list(h) for h in before], noise_multiplier, sample_rate, 1))
            check(before, after)
            self._reserved -= 1
            return before, after
        self._reserved, self._reserved_at = 0, None  # another (sigma, q): what is left stays counted
        for _ in range(MAX_CONFLICTS):
            obj = self._get()
            history = _history(obj)
            status = obj.get("status") or {}
            check_unit(status.get("groupSize", 1 if history else None), group_size, self.dataset_id)
            steps = self._reservable(history, noise_multiplier, sample_rate, check)
            reserved = _with(history, noise_multiplier, sample_rate, steps)
            if self._write(obj, reserved, client_id, group_size):
                before = _frozen(history)  # nothing of this trainer's is left unused in it
                self._remember(reserved)
                self._reserved, self._reserved_at = steps - 1, (noise_multiplier, sample_rate)
                after = self._view(reserved)
                check(before, after)  # within what was reserved; reports this step's own epsilons
                return before, after
        raise TrainingClientError(f"PrivacyBudget {self.name} kept changing under {MAX_CONFLICTS} attempts to reserve "
                                  "a step; no weights were changed")

    def _reservable(self, history: list[list], sigma: float, q: float, check) -> int:
        """The most steps up to ``chunk`` that fit every budget; raises (the check's error) if one does not."""
        def fits(steps: int) -> bool:
            after = _frozen(_with(history, sigma, q, steps))
            try:
                check(_frozen(history), after)
            except DPBudgetExceededError:
                if steps == 1:
                    raise
                return False
            return True

        if fits(self.chunk):
            return self.chunk
        fits(1)  # raises the check's error if not even one step fits
        low, high = 1, self.chunk  # fits(low), not fits(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    def _write(self, obj: dict, history: list[list], client_id: str, group_size: int) -> bool:
        """Replace the status computed from ``obj``; False if another writer came first (409)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        delta = (obj.get("spec") or {}).get("delta") or 1e-5
        status = {"history": [{"noiseMultiplier": s, "sampleRate": q, "steps": n} for s, q, n in history],
                  "steps": sum(n for _, _, n in history), "epsilon": self._epsilon(_frozen(history), delta),
                  "delta": delta, "accountant": self._accountant, "lastWriter": client_id, "groupSize": group_size}
        body = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": status}
        try:
            self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PRIVACY_BUDGETS,
                                                           self.name, body, _request_timeout=REQUEST_TIMEOUT_S)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise TrainingClientError(f"cannot reserve privacy budget in {self.name} (HTTP {error.status}): "
                                      f"{error.reason}; no weights were changed") from None
        except (HTTPError, OSError) as error:
            raise TrainingClientError(f"cannot reach the API to reserve privacy budget in {self.name} ({error}); "
                                      "no weights were changed") from None
