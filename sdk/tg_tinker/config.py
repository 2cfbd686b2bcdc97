"""Training configuration: what a user builds, what the trainer and the custom resource carry."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from .wire import WireModel

DEFAULT_MODEL = "smollm2-135m"
MAX_LORA_RANK = 1024  # past this a LoRA is no longer low-rank for any model this trainer serves


class LoRAConfig(WireModel):
    rank: int = Field(16, gt=0, le=MAX_LORA_RANK, description="rank of the low-rank matrices")
    alpha: float = Field(32.0, gt=0, description="scaling factor; the update is scaled by alpha/rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    bias: Literal["none", "all", "lora_only"] = "none"


class OptimizerConfig(WireModel):
    name: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1.0, description="SGD only")
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    total_steps: Optional[int] = Field(None, gt=0, description="needed by the linear and cosine schedules")

    @model_validator(mode="after")
    def _check(self):
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("betas must both lie in [0, 1)")
        if self.lr_schedule != "constant" and self.total_steps is None:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} needs total_steps")
        return self


class DPConfig(WireModel):
    """DP-SGD settings. See the Privacy section of the API contract."""

    enabled: bool = True
    noise_multiplier: Optional[float] = Field(
        None, ge=0, description="noise std as a multiple of max_grad_norm; computed from target_epsilon if None"
    )
    # A floor: at denormal scale float32 noise is no longer Gaussian, and the mechanism no longer the analysed one.
    max_grad_norm: float = Field(1.0, ge=1e-6, le=1e6, description="per-example clipping bound")
    target_epsilon: Optional[float] = Field(None, gt=0, description="budget; steps past it are refused")
    # Above 0.1 delta says "anything may happen" too often to mean privacy, and the RDP conversion goes negative.
    target_delta: float = Field(1e-5, gt=0, le=0.1)
    # Only accountants whose epsilon is an upper bound: GDP (a central-limit approximation) can report less than
    # the mechanism spends, so it is refused with the reason (see _refuse_gdp).
    accountant_type: Literal["rdp", "prv"] = "rdp"
    sample_rate: Optional[float] = Field(None, gt=0, le=1)
    dataset_size: Optional[int] = Field(None, ge=1)
    planned_steps: Optional[int] = Field(
        None, ge=1, description="optimizer steps planned; with target_epsilon, sets the noise multiplier"
    )
    group_size: int = Field(
        1, ge=1, le=1024,
        description="consecutive rows of a batch that form one privacy unit (the G samples of one prompt): their "
                    "summed gradient is clipped as one, and epsilon is that of one group")
    dataset_id: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="the data this client trains on: a registered dataset (sampled on the server with "
                    "sample_rate) or a name for client-supplied data; keys the privacy ledger (default: one "
                    "ledger per tenant)")

    @field_validator("accountant_type", mode="before")
    @classmethod
    def _refuse_gdp(cls, value):
        if value == "gdp":
            raise ValueError("accountant_type='gdp' is refused: the Gaussian-DP accountant is a central-limit "
                             "approximation whose epsilon can be below what the mechanism spends (sigma 0.6, q 0.01, "
                             "50 steps: GDP 1.03 where PLD gives 3.35); use 'rdp' or 'prv'")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and self.noise_multiplier == 0:
            raise ValueError("noise_multiplier=0 releases unnoised gradients: DP needs noise_multiplier > 0 "
                             "(or dp_config=None for no DP)")
        if self.enabled and self.noise_multiplier is None:
            if self.target_epsilon is None or self.planned_steps is None:
                raise ValueError(
                    "noise_multiplier is required unless target_epsilon and planned_steps are given "
                    "(then it is computed)"
                )
        return self


class TrainingConfig(WireModel):
    model_ref: str = Field(DEFAULT_MODEL, min_length=1)
    lora_config: Optional[LoRAConfig] = Field(
        default_factory=LoRAConfig, description="None means full fine-tuning"
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    batch_size: int = Field(8, ge=1, description="examples per forward_backward call (an upper bound)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    dp_config: Optional[DPConfig] = None
    seed: int = 0
    max_seq_len: int = Field(2048, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def dp_enabled(self) -> bool:
        return self.dp_config is not None and self.dp_config.enabled

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps
