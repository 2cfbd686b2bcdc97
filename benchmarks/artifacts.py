"""What encryption costs when saving a checkpoint.

In one process: an encrypted save (serialize, AES-256-GCM envelope, SHA-256 of the stored bytes,
write to a temporary name, fsync, rename, fsync the folder) against a plain ``torch.save`` of the same
state (fsync), and against a plain save that is as durable (fsync, then the folder's fsync: without it a
new file's name can vanish in a power cut, on ext4 and XFS alike), for a small LoRA state and a ~200 MB
model+optimizer state. Rounds alternate; the median of the per-round ratios is reported. A small save
takes milliseconds, so it gets ``SMALL_ROUNDS_FACTOR`` times as many rounds: one slow fsync must not
decide its median.

    python benchmarks/artifacts.py [--rounds 5] [--json]
"""

from __future__ import annotations

import os
import sys
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from common import run_benchmark  # noqa: E402
from tg_tinker import BatchData, LoRAConfig, TrainingConfig  # noqa: E402

SMALL = TrainingConfig(model_ref="tiny-random-llama:hidden=256,layers=4", batch_size=2, max_seq_len=32,
                       lora_config=LoRAConfig(rank=16))
LARGE = TrainingConfig(model_ref="tiny-random-llama:hidden=512,layers=4,vocab=4096,intermediate=1536", batch_size=2,
                       max_seq_len=32, lora_config=None)  # full fine-tuning: weights + two AdamW moments
SMALL_ROUNDS_FACTOR = 8


def trained_state(config: TrainingConfig) -> dict:
    from tensafe_trainer.engine.adapter import AdapterSlot

    engine = AdapterSlot(config)
    engine.forward_backward(BatchData(input_ids=[[1, 2, 3, 4]] * 2))
    engine.optim_step()
    return engine.state_dict(include_optimizer=True)


def plain_save(state: dict, folder: Path, durable: bool = False) -> float:
    path = folder / "plain.pt"
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if durable:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def encrypted_save(state: dict, store) -> float:
    """What save_state does: torch.save streamed into the encrypting, hashing, fsyncing store."""
    from tensafe_trainer.engine.adapter import write_state

    start = time.perf_counter()
    info = store.put(lambda out: write_state(state, out), tenant_id="bench", training_client_id="tc-bench",
                     kind="checkpoint", step=1, name="nightly",  # name and metadata sealed, as save_state does
                     metadata={"epoch": 1, "validation_loss": 0.42, "dataset_version": "v2"})
    elapsed = time.perf_counter() - start
    store.delete("bench", info.artifact_id)
    return elapsed


def measure(rounds: int) -> dict:
    from tensafe_trainer.storage.artifacts import ArtifactStore
    from tensafe_trainer.engine.adapter import serialize_state
    from tensafe_keys.store import LocalKeyProvider

    result = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TENSAFE_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        store = ArtifactStore(folder / "artifacts", LocalKeyProvider(folder / "keys"))
        for label, config in (("small", SMALL), ("large", LARGE)):
            state = trained_state(config)
            size = len(serialize_state(state))
            plain_save(state, folder), encrypted_save(state, store)  # warm-up
            plain, durable, encrypted = [], [], []
            for _ in range(rounds * (SMALL_ROUNDS_FACTOR if label == "small" else 1)):
                plain.append(plain_save(state, folder))
                durable.append(plain_save(state, folder, durable=True))
                encrypted.append(encrypted_save(state, store))
            result[f"ratio_{label}"] = round(statistics.median([e / p for e, p in zip(encrypted, plain)]), 4)
            result[f"ratio_{label}_durable"] = round(statistics.median([e / d for e, d in zip(encrypted, durable)]), 4)
            result[f"{label}_bytes"] = size
            result[f"{label}_plain_ms"] = round(statistics.median(plain) * 1000, 1)
            result[f"{label}_durable_ms"] = round(statistics.median(durable) * 1000, 1)
            result[f"{label}_encrypted_ms"] = round(statistics.median(encrypted) * 1000, 1)
    result["rounds"] = rounds
    return result


def report(result: dict) -> None:
    for label in ("small", "large"):
        print(f"{label:5} state {result[f'{label}_bytes'] / 1e6:8.1f} MB: plain {result[f'{label}_plain_ms']:8.1f} ms, "
              f"plain+folder fsync {result[f'{label}_durable_ms']:8.1f} ms, encrypted "
              f"{result[f'{label}_encrypted_ms']:8.1f} ms; ratio {result[f'ratio_{label}']:.3f} vs plain, "
              f"{result[f'ratio_{label}_durable']:.3f} vs as durable (target <= 1.10)")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, rounds=5)
