"""What the service costs over a bare training loop.

In one process, trains the same tiny Llama (hidden 256, 4 layers, LoRA r16 on q/k/v/o, batch 8x128)
for the same number of steps:
  (a) direct: a plain in-process transformers + peft loop;
  (b) sdk: through tg_tinker and the local trainer server, futures pipelined.
Short rounds alternate a/b (a first in even rounds, b first in odd ones) so the slow phases of a
noisy machine hit both alike; the reported ratio is the median of the per-round ratios, with a 95%
confidence interval for that median (from order statistics: no assumption about the noise's shape).
On a noisy machine, read the interval, not the point: it says what the rounds can and cannot show.

    python benchmarks/overhead.py [--steps 8] [--rounds 32] [--json]
"""

from __future__ import annotations

import os
import sys
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import ratio_of_rounds, report_ratio, run_benchmark  # noqa: E402
from tg_tinker import BatchData, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig  # noqa: E402

MODEL = "tiny-random-llama:hidden=256,layers=4"
BATCH, SEQ, VOCAB = 8, 128, 4096
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SETTLE_S = 0.1


def make_batches(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    batches = []
    for _ in range(n):
        ids = [[rng.randrange(VOCAB) for _ in range(SEQ)] for _ in range(BATCH)]
        labels = [row[1:] + [-100] for row in ids]
        batches.append({"input_ids": ids, "labels": labels})
    return batches


class DirectLoop:
    """The baseline: a plain transformers + peft training loop in this process."""

    def __init__(self):
        from peft import LoraConfig, get_peft_model

        from tensafe_trainer.engine.models import build_tiny_llama

        self.model = get_peft_model(build_tiny_llama(MODEL, seed=0),
                                    LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def run(self, batches: list[dict]) -> int:
        tokens = 0
        for batch in batches:
            ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
            logits = self.model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            tokens += int((labels != -100).sum())
        return tokens


class SdkLoop:
    """The same training through tg_tinker and the local trainer server, futures pipelined."""

    def __init__(self, service: ServiceClient):
        config = TrainingConfig(model_ref=MODEL, lora_config=LoRAConfig(rank=16, alpha=32, target_modules=TARGETS),
                                optimizer=OptimizerConfig(learning_rate=1e-4), batch_size=BATCH, max_seq_len=SEQ)
        self.tc = service.create_training_client(config)

    def run(self, batches: list[dict]) -> int:
        futures = []
        for batch in batches:
            futures.append(self.tc.forward_backward(batch))
            last = self.tc.optim_step()
        last.result()  # the round ends when its last update is applied
        return sum(f.result().tokens_processed for f in futures)


def timed(loop, batches) -> float:
    # After a loop's last step its OpenMP workers spin-wait for more work (measured: about 10 ms of CPU);
    # let them go idle first, so that one loop's spinning does not land in the other's timing.
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    tokens = loop.run(batches)
    return tokens / (time.perf_counter() - start)


def measure(steps: int, rounds: int) -> dict:
    batches = make_batches(steps)
    sdk_batches = [BatchData(**b) for b in batches]  # validated once, like a prepared dataset
    direct_runs, sdk_runs = [], []
    with ServiceClient(home=tempfile.mkdtemp(prefix="tensafe-bench-overhead-")) as service:  # a home of its own
        direct, sdk = DirectLoop(), SdkLoop(service)
        timed(direct, batches[:3])  # warm-up
        timed(sdk, sdk_batches[:3])
        for i in range(rounds):  # alternate, and swap which goes first, so slow phases hit both alike
            if i % 2:
                sdk_runs.append(timed(sdk, sdk_batches))
                direct_runs.append(timed(direct, batches))
            else:
                direct_runs.append(timed(direct, batches))
                sdk_runs.append(timed(sdk, sdk_batches))
    return {"direct_tok_s": round(statistics.median(direct_runs), 1),
            "sdk_tok_s": round(statistics.median(sdk_runs), 1),
            **ratio_of_rounds(sdk_runs, direct_runs), "steps_per_round": steps}


def report(result: dict) -> None:
    report_ratio(result, ("tg_tinker + queue", "direct peft loop"), (result["sdk_tok_s"], result["direct_tok_s"]),
                 "target >= 0.97")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, steps=8, rounds=32)
