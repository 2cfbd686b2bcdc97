"""What DP-SGD costs, and how TenSafe's implementation compares with opacus' own.

In one process, on the tiny Llama of the overhead benchmark (hidden 256, 4 layers, batch 8x128), tokens/s for
  (a) nodp:   TenSafe's engine without DP;
  (b) dp:     TenSafe's engine with DP-SGD (per-example clipping, CSPRNG noise, the ledger's fsynced record
              and accounting every step);
  (c) opacus: opacus' GradSampleModule + DPOptimizer on the same peft model, same per-example loss
              (its noise from torch's generator: faster, and predictable, see docs/privacy.md);
  (d) group4: (b) with dp group_size 4 (each 4 consecutive rows one privacy unit, their summed gradient
              clipped as one: the Tinker wire's RL groups);
for LoRA r16 on q/k/v/o, then (a) and (b) again with every parameter trained (full fine-tuning), where
the noise is drawn for all of them each step. Short rounds alternate; ratios are medians of per-round
ratios.

    python benchmarks/dp.py [--steps 6] [--rounds 6] [--json]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from overhead import BATCH, MODEL, SEQ, TARGETS, make_batches  # noqa: E402
from common import run_benchmark  # noqa: E402
from tg_tinker import BatchData, DPConfig, LoRAConfig, OptimizerConfig, TrainingConfig  # noqa: E402

NOISE, CLIP = 1.0, 1.0


def engine_loop(dp: bool, lora: bool = True, group_size: int = 1):
    from tensafe_trainer.engine.adapter import AdapterSlot
    from tensafe_trainer.privacy.ledger import PrivacyLedger
    from tensafe_keys.store import LocalKeyProvider

    config = TrainingConfig(
        model_ref=MODEL, batch_size=BATCH, max_seq_len=SEQ, optimizer=OptimizerConfig(learning_rate=1e-4),
        lora_config=LoRAConfig(rank=16, alpha=32, target_modules=TARGETS) if lora else None,
        dp_config=DPConfig(noise_multiplier=NOISE, max_grad_norm=CLIP, dataset_size=10_000,
                           group_size=group_size) if dp else None)
    folder = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    ledger = PrivacyLedger(folder / "privacy", "default", None, keys=LocalKeyProvider(folder / "keys")) if dp else None
    engine = AdapterSlot(config, ledger=ledger)

    def run(batches: list[BatchData]) -> int:
        tokens = 0
        for batch in batches:
            tokens += engine.forward_backward(batch).tokens_processed
            engine.optim_step()
        return tokens

    return run


def opacus_loop():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from peft import LoraConfig, get_peft_model

    from tensafe_trainer.engine.models import build_tiny_llama

    model = get_peft_model(build_tiny_llama(MODEL, seed=0),
                           LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    module = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4),
                            noise_multiplier=NOISE, max_grad_norm=CLIP, expected_batch_size=BATCH)

    def run(batches: list[BatchData]) -> int:
        tokens = 0
        for batch in batches:
            ids, labels = torch.tensor(batch.input_ids), torch.tensor(batch.labels)
            logits = module(input_ids=ids).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            counts = (labels != -100).sum(dim=1).clamp(min=1)
            loss = (nll.sum(dim=1) / counts).mean()  # per-example mean, batch mean: opacus' "mean" reduction
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int((labels != -100).sum())
        return tokens

    return run


def timed(run, batches) -> float:
    start = time.perf_counter()
    tokens = run(batches)
    return tokens / (time.perf_counter() - start)


def alternate(loops: dict, batches: list, rounds: int) -> dict[str, list[float]]:
    for run in loops.values():
        timed(run, batches[:2])  # warm-up
    runs = {name: [] for name in loops}
    for _ in range(rounds):
        for name, run in loops.items():
            runs[name].append(timed(run, batches))
    return runs


def ratio(runs: dict, a: str, b: str) -> float:
    return round(statistics.median([x / y for x, y in zip(runs[a], runs[b])]), 4)


def measure(steps: int, rounds: int) -> dict:
    batches = [BatchData(**b) for b in make_batches(steps)]
    lora = alternate({"nodp": engine_loop(dp=False), "dp": engine_loop(dp=True), "opacus": opacus_loop(),
                      "group4": engine_loop(dp=True, group_size=4)}, batches, rounds)
    full = alternate({"nodp": engine_loop(dp=False, lora=False), "dp": engine_loop(dp=True, lora=False)},
                     batches, rounds)
    median = {name: round(statistics.median(values), 1) for name, values in lora.items()}
    return {"nodp_tok_s": median["nodp"], "dp_tok_s": median["dp"], "opacus_tok_s": median["opacus"],
            "dp_over_nodp": ratio(lora, "dp", "nodp"), "dp_over_opacus": ratio(lora, "dp", "opacus"),
            "group4_tok_s": median["group4"], "group4_over_dp": ratio(lora, "group4", "dp"),
            "full_nodp_tok_s": round(statistics.median(full["nodp"]), 1),
            "full_dp_tok_s": round(statistics.median(full["dp"]), 1),
            "full_dp_over_nodp": ratio(full, "dp", "nodp"), "rounds": rounds, "steps_per_round": steps}


def report(result: dict) -> None:
    print("LoRA r16 (q/k/v/o):")
    print(f"  no DP          : {result['nodp_tok_s']:9.1f} tok/s")
    print(f"  TenSafe DP-SGD : {result['dp_tok_s']:9.1f} tok/s  ({result['dp_over_nodp']:.3f} of no-DP, "
          "target >= 0.90)")
    print(f"  opacus         : {result['opacus_tok_s']:9.1f} tok/s  (TenSafe/opacus {result['dp_over_opacus']:.3f}, "
          "target >= 1.0)")
    print(f"  DP, groups of 4: {result['group4_tok_s']:9.1f} tok/s  ({result['group4_over_dp']:.3f} of DP with one "
          "row a unit)")
    print("full fine-tuning (every parameter):")
    print(f"  no DP          : {result['full_nodp_tok_s']:9.1f} tok/s")
    print(f"  TenSafe DP-SGD : {result['full_dp_tok_s']:9.1f} tok/s  ({result['full_dp_over_nodp']:.3f} of no-DP)")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, steps=6, rounds=6)
