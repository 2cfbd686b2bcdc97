"""In-process engine helpers for numerical tests (float64, SGD lr=1: the update is minus the gradient)."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from tg_tinker import BatchData, DPConfig, OptimizerConfig

from conftest import tiny_config

SGD1 = OptimizerConfig(name="sgd", learning_rate=1.0)


def fresh_ledger(dataset_id=None):
    """A privacy ledger of its own, in a new folder."""
    from tensafe_trainer.privacy.ledger import PrivacyLedger

    from tensafe_keys.store import LocalKeyProvider

    folder = Path(tempfile.mkdtemp(prefix="ledger-"))
    return PrivacyLedger(folder / "privacy", "default", dataset_id, keys=LocalKeyProvider(folder / "keys"))


def make_engine(ledger=None, dataset=None, host=None, **overrides):
    """A float64 slot trained by SGD at lr 1 (on ``host``, or a host of its own), its LoRA B not zero."""
    from tensafe_trainer.engine.adapter import AdapterSlot

    values = dict(dtype="float64", optimizer=SGD1)
    values.update(overrides)
    config = tiny_config(**values)
    if config.dp_enabled and ledger is None:
        ledger = fresh_ledger(config.dp_config.dataset_id)
    engine = AdapterSlot(config, host=host, ledger=ledger, dataset=dataset)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in engine.trainable.items():
            if "lora_B" in name:  # peft starts B at zero, which would make A's gradient vanish
                p.normal_(0.0, 0.2)
    return engine


def snapshot(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.trainable.items()}


def update(engine, before) -> dict[str, torch.Tensor]:
    return {n: before[n] - p.detach() for n, p in engine.trainable.items()}


def padded_batch(rows: list[list[int]], side: str = "right", pad: int = 0) -> BatchData:
    """Each row is a token sequence; labels are next tokens; padding on ``side``."""
    width = max(len(r) for r in rows)
    ids, mask, labels = [], [], []
    for r in rows:
        gap = width - len(r)
        row_labels = r[1:] + [-100]
        if side == "right":
            ids.append(r + [pad] * gap), mask.append([1] * len(r) + [0] * gap)
            labels.append(row_labels + [-100] * gap)
        else:
            ids.append([pad] * gap + r), mask.append([0] * gap + [1] * len(r))
            labels.append([-100] * gap + row_labels)
    return BatchData(input_ids=ids, attention_mask=mask, labels=labels)


def per_example_gradients(engine, rows: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Each example alone, unpadded: gradient of its mean token NLL. Independent of the engine's hooks."""
    grads = []
    model = engine.model
    for r in rows:
        for p in engine.trainable.values():
            p.grad = None
        ids = torch.tensor([r])
        labels = torch.tensor(r[1:] + [-100])
        logits = model(input_ids=ids).logits[0]
        loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / (len(r) - 1)
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in engine.trainable.items()})
        for p in engine.trainable.values():
            p.grad = None
    return grads


def norm(grad: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g ** 2).sum() for g in grad.values())))


def clipped_mean(grads: list[dict[str, torch.Tensor]], max_norm: float) -> dict[str, torch.Tensor]:
    total = {n: torch.zeros_like(g) for n, g in grads[0].items()}
    for g in grads:
        factor = min(1.0, max_norm / (norm(g) + 1e-6))
        for n in total:
            total[n] += factor * g[n]
    return {n: t / len(grads) for n, t in total.items()}


def assert_close(actual: dict, expected: dict, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert actual.keys() == expected.keys()
    for n in actual:
        torch.testing.assert_close(actual[n], expected[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def sequences(n: int, seed: int, lengths=(5, 9, 12, 7, 10, 6)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def fresh_ledger_at(ledger):
    """Another ledger object on the same file, as another process or a restarted trainer opens it."""
    from tensafe_trainer.privacy.ledger import PrivacyLedger

    return PrivacyLedger(ledger.path.parent.parent, ledger.tenant_id, ledger.dataset_id, keys=ledger.keys)


def dataset(n: int, seed: int) -> list[dict]:
    return [{"input_ids": r} for r in sequences(n, seed=seed)]


def sampled_engine(n=20, q=0.25, **overrides):
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=10.0, dataset_id="facts", sample_rate=q)
    return make_engine(dp_config=config, batch_size=3, dataset=dataset(n, seed=21), **overrides)
