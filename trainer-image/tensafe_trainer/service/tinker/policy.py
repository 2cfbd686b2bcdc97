"""The server's privacy policy for the Tinker wire, which has no DP fields of its own.

``tensafe serve --privacy-policy FILE`` (JSON or YAML) maps a tenant id, or ``"default"``, to
``{"dp": {...DPConfig fields...}, "batch_size": N, "group_size": G}``. When a tenant's entry has ``dp``, every model
it creates trains with DP-SGD: TenSafe's mechanism, ledger, budget and receipts, and ``batch_size`` (default
128) caps the examples of one logical batch (between two ``optim_step`` calls). A Tinker client sends its own
batches, so its steps are charged at q = 1: the server draws nothing it could certify, and a policy's
``sample_rate`` is refused when the policy is loaded (``dataset_size`` gives only a labelled claim, never the
headline). ``group_size`` (default 1) makes G consecutive datums one privacy unit, clipped together: the G samples
of one prompt in the cookbook's RL recipes. A client cannot loosen DP: a model's ``user_metadata`` may only tighten
it (``tensafe.dp.noise_multiplier`` up, ``tensafe.dp.group_size`` where the policy's is 1,
``tensafe.dp.max_grad_norm``, ``tensafe.dp.target_epsilon`` and ``tensafe.dp.target_delta`` down); a looser value
is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from tg_tinker.config import DPConfig, TrainingConfig
from tg_tinker.errors import ValidationError
from tg_tinker.types import check_tenant

DEFAULT_BATCH_SIZE = 128
METADATA_PREFIX = "tensafe.dp."
# metadata key -> (DPConfig field, which way is tighter: +1 larger, -1 smaller)
TIGHTENING = {"noise_multiplier": 1, "max_grad_norm": -1, "target_epsilon": -1, "target_delta": -1, "group_size": 1}
ENTRY_KEYS = {"dp", "batch_size", "group_size"}


@dataclass(frozen=True)
class TenantPolicy:
    dp: Optional[DPConfig]
    batch_size: int = DEFAULT_BATCH_SIZE


class PrivacyPolicy:
    def __init__(self, entries: Mapping[str, TenantPolicy]):
        self.entries = dict(entries)

    @classmethod
    def load(cls, path: Optional[Path]) -> "PrivacyPolicy":
        if path is None:
            return cls({})
        text = Path(path).read_text()
        raw = json.loads(text) if path.suffix == ".json" else _yaml(text)
        if not isinstance(raw, dict):
            raise ValueError(f"privacy policy {path}: a mapping of tenant ids (or 'default') to entries")
        entries = {}
        for tenant, entry in raw.items():
            if tenant != "default":
                check_tenant(tenant)
            if not isinstance(entry, dict) or set(entry) - ENTRY_KEYS:
                raise ValueError(f"privacy policy {path}: tenant {tenant!r} takes {sorted(ENTRY_KEYS)} only")
            entries[tenant] = _entry(f"privacy policy {path}: tenant {tenant!r}", entry)
        return cls(entries)

    def with_client(self, tenant_id: str, config: TrainingConfig) -> "PrivacyPolicy":
        """A trainer started for one client (a TrainingClient's pod): its tenant's Tinker models train with that
        client's DP config (same dataset, so the same ledger and budget) and logical batch. A policy file that
        also names the tenant is refused: the client's spec is the one place its DP is set.

        Not the client's ``sample_rate``: that is the rate of the client's own sampling (server-side Poisson,
        or its own claim), and says nothing of the batches a Tinker client sends: Tinker steps are charged at q = 1
        (a ``dataset_size`` gives only the labelled claim, ``epsilon_asserted``)."""
        if tenant_id in self.entries:
            raise ValueError(f"privacy policy: tenant {tenant_id!r} is this trainer's own client's: its DP comes from "
                             "the client's config, not from the policy file")
        dp = config.dp_config.model_copy(update={"sample_rate": None}) if config.dp_enabled else None
        return PrivacyPolicy({**self.entries, tenant_id: TenantPolicy(dp, config.effective_batch_size)})

    def for_tenant(self, tenant_id: str) -> TenantPolicy:
        return self.entries.get(tenant_id) or self.entries.get("default") or TenantPolicy(None)

    def dp_for(self, tenant_id: str, user_metadata: Optional[Mapping[str, Any]]) -> Optional[DPConfig]:
        """The tenant's DP config, tightened by the model's metadata where it asks; never loosened."""
        base = self.for_tenant(tenant_id).dp
        asked = {k[len(METADATA_PREFIX):]: v for k, v in (user_metadata or {}).items() if k.startswith(METADATA_PREFIX)}
        if not asked:
            return base
        if base is None:
            raise ValidationError("this tenant's privacy policy has no DP: user_metadata cannot configure it "
                                  "(ask the trainer's operator for a DP policy)", {"field": "user_metadata"})
        updates = {}
        for name, value in asked.items():
            if name not in TIGHTENING:
                raise ValidationError(f"user_metadata '{METADATA_PREFIX}{name}' is not a DP setting a client may "
                                      f"tighten; these are: {sorted(TIGHTENING)}", {"field": "user_metadata"})
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValidationError(f"user_metadata '{METADATA_PREFIX}{name}' must be a number",
                                      {"field": "user_metadata"}) from None
            if name == "group_size" and not (number.is_integer() and base.group_size in (1, number)):
                # A policy that names a unit keeps it: a group of the policy's split across two of the model's, or
                # sharing one with another, could move the update by up to 2 C. Where the policy names none (1),
                # the model declares its own (its RL groups).
                raise ValidationError(f"user_metadata '{METADATA_PREFIX}group_size' may declare a group where the "
                                      f"policy has none; this policy's unit is {base.group_size} rows",
                                      {"field": "user_metadata"})
            current = getattr(base, name)
            if current is None:  # the policy's noise is computed from its target_epsilon: tighten that instead
                raise ValidationError(f"the policy sets no {name} of its own (it is computed from target_epsilon and "
                                      "planned_steps): tighten target_epsilon instead", {"field": "user_metadata"})
            if not math.isfinite(number) or (number - current) * TIGHTENING[name] < 0:
                raise ValidationError(f"user_metadata may tighten DP, never loosen it: {name}={number:g} is looser "
                                      f"than the policy's {current:g}", {"field": "user_metadata"})
            updates[name] = int(number) if name == "group_size" else number
        return DPConfig.parse({**base.model_dump(), **updates})


def _entry(where: str, entry: dict) -> TenantPolicy:
    raw_dp = entry.get("dp")
    if raw_dp is not None and not isinstance(raw_dp, dict):
        raise ValueError(f"{where}: 'dp' is a mapping of DPConfig fields")
    if raw_dp and raw_dp.get("sample_rate") is not None:
        raise ValueError(f"{where}: 'sample_rate' is refused: a Tinker client sends its own batches, which the server "
                         "does not draw, so they are charged at q = 1 (amplification by subsampling holds only for "
                         "sampling the server does)")
    if raw_dp and "group_size" in raw_dp:
        raise ValueError(f"{where}: group_size belongs to the entry, beside 'dp'")
    group_size = entry.get("group_size", 1)
    if raw_dp is None and "group_size" in entry:
        raise ValueError(f"{where}: group_size is a DP setting; this entry has no 'dp'")
    dp = DPConfig.parse({**raw_dp, "group_size": group_size}) if raw_dp is not None else None
    batch_size = int(entry.get("batch_size", DEFAULT_BATCH_SIZE))
    if batch_size < 1:
        raise ValueError(f"{where}: batch_size must be >= 1")
    return TenantPolicy(dp if dp is not None and dp.enabled else None, batch_size)


def _yaml(text: str):
    import yaml

    return yaml.safe_load(text)
