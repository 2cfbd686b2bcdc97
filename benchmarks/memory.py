"""Peak memory of one training request, the loss in chunks of positions vs the whole width at once.

A tiny Llama with a 32k vocabulary (the logits dominate, as with real vocabularies), one forward_backward of
``rows`` x ``width`` tokens, each measurement in a fresh process: its peak resident memory during the request
above what it held before, and the request's time. Alternated rounds; ratios are chunked / whole. Two setups:
LoRA on attention, and DP-SGD with LoRA on the output head too (per-example gradients of the head, chunk by
chunk).

    python benchmarks/memory.py [--rows 4] [--width 1024] [--rounds 3] [--json]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_benchmark  # noqa: E402

MODEL = "tiny-random-llama:hidden=64,layers=2,vocab=32000,heads=4"

CHILD = """
import json, resource, sys, tempfile, time
from pathlib import Path
from tg_tinker import BatchData, DPConfig, LoRAConfig, TrainingConfig
from tensafe_keys.store import LocalKeyProvider
from tensafe_trainer.privacy.ledger import PrivacyLedger
from tensafe_trainer.engine import logits
from tensafe_trainer.engine.adapter import AdapterSlot
chunked, rows, width, private = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), sys.argv[5] == "1"
if not chunked:
    logits.CHUNK = None
targets = ["q_proj", "v_proj"] + (["lm_head"] if private else [])
config = TrainingConfig(model_ref=sys.argv[4], batch_size=rows + 1, max_seq_len=width, dtype="float32",
                        lora_config=LoRAConfig(rank=8, alpha=16, target_modules=targets),
                        dp_config=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0) if private else None)
ledger = None
if private:
    folder = Path(tempfile.mkdtemp())
    ledger = PrivacyLedger(folder / "privacy", "default", None, keys=LocalKeyProvider(folder / "keys"))
slot = AdapterSlot(config, ledger=ledger)
ids = [[(7 * r + 13 * t) % 32000 for t in range(width)] for r in range(rows)]
batch = BatchData(input_ids=ids, attention_mask=[[1] * width] * rows)
slot.forward_backward(BatchData(input_ids=[ids[0][:8]], attention_mask=[[1] * 8]))  # warm up, small
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
slot.forward_backward(batch)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (peak - before) / 1024, "seconds": seconds}))
"""


def one(chunked: bool, rows: int, width: int, private: bool) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TENSAFE_REQUEST_MEMORY": str(1 << 40)}
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if chunked else "0", str(rows), str(width), MODEL,
                          "1" if private else "0"], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(rows: int, width: int, rounds: int, private: bool) -> dict:
    chunked, whole = [], []
    for i in range(rounds):
        for flag in ((True, False) if i % 2 == 0 else (False, True)):
            (chunked if flag else whole).append(one(flag, rows, width, private))
    median = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"chunked_peak_mib": round(median(chunked, "peak_mib"), 1),
            "whole_peak_mib": round(median(whole, "peak_mib"), 1),
            "memory_ratio": round(median(chunked, "peak_mib") / median(whole, "peak_mib"), 3),
            "time_ratio": round(median(chunked, "seconds") / median(whole, "seconds"), 3)}


def measure(rows: int, width: int, rounds: int) -> dict:
    logits_mib = rows * width * 32000 * 4 / 2**20
    return {"rows": rows, "width": width, "vocab": 32000, "logits_mib": round(logits_mib, 1), "rounds": rounds,
            "lora": compare(rows, width, rounds, private=False), "dp_head": compare(rows, width, rounds, private=True)}


def report(result: dict) -> None:
    print(f"one forward_backward of {result['rows']} x {result['width']} tokens, vocabulary {result['vocab']} "
          f"(one float32 copy of its logits: {result['logits_mib']} MiB)")
    for setup, name in (("lora", "LoRA on attention"), ("dp_head", "DP-SGD, LoRA on attention and the head")):
        row = result[setup]
        print(f"{name}: peak memory above the idle engine: chunked {row['chunked_peak_mib']} MiB, whole width "
              f"{row['whole_peak_mib']} MiB (ratio {row['memory_ratio']}); time ratio (chunked / whole) "
              f"{row['time_ratio']} (medians of {result['rounds']} rounds)")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, rows=4, width=1024, rounds=3)
