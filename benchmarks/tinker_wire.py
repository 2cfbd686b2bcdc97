"""The Tinker wire's cost: the official ``tinker`` SDK against ``tensafe serve`` vs ``tg_tinker``, same trainer.

One ``tensafe serve`` (a local trainer) runs two training clients on the same tiny Llama (hidden 256, 4
layers, LoRA r16 on q/k/v/o, batch 8x128):
  (a) tg_tinker: ``forward_backward`` + ``optim_step`` per batch, futures pipelined (TenSafe's own API);
  (b) tinker: the cookbook's supervised step through the unmodified SDK under ``/api/v1``: ``Datum``s with
      ``target_tokens`` and ``weights``, ``forward_backward(data, "cross_entropy")``, ``optim_step(AdamParams)``,
      submitted ahead and awaited at the end of the round, as the cookbook's SL loop pipelines them.
Rounds alternate a/b (and which goes first) so a noisy machine's slow phases hit both alike; the ratio is
the median of the per-round ratios (tinker / tg_tinker), with a distribution-free 95% interval.

    python benchmarks/tinker_wire.py [--steps 8] [--rounds 16] [--json]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")  # nothing leaves the machine
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinker  # noqa: E402  (the official SDK)

from common import ratio_of_rounds, report_ratio, run_benchmark  # noqa: E402
from overhead import MODEL, SEQ, SdkLoop, make_batches, timed  # noqa: E402
from tg_tinker import BatchData, ServiceClient  # noqa: E402
from tg_tinker.local import LocalTrainer  # noqa: E402

LEARNING_RATE = 1e-4


class TinkerLoop:
    """The cookbook's SL step through the official SDK: LoRA on attention only, like the tg_tinker client."""

    def __init__(self, base_url: str, api_key: str):
        self.types = tinker.types
        self.tokens: dict[int, int] = {}  # id of a prepared batch -> its trained tokens
        self.service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
        self.tc = self.service.create_lora_training_client(base_model=MODEL, rank=16, train_mlp=False,
                                                           train_unembed=False).result()

    def data(self, batch: dict) -> list:
        """One cookbook datum per row: inputs, next-token targets, a weight per target (0 where padding)."""
        datums = []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            weights = [0.0 if label == -100 else 1.0 for label in labels]
            targets = [0 if label == -100 else label for label in labels]
            datums.append(self.types.Datum(model_input=self.types.ModelInput.from_ints(ids),
                                           loss_fn_inputs={"target_tokens": targets, "weights": weights}))
        self.tokens[id(datums)] = sum(label != -100 for labels in batch["labels"] for label in labels)
        return datums

    def run(self, batches: list[list]) -> int:
        futures, adam = [], self.types.AdamParams(learning_rate=LEARNING_RATE)
        for data in batches:
            futures.append(self.tc.forward_backward(data, "cross_entropy"))
            last = self.tc.optim_step(adam)
        last.result()
        for f in futures:
            f.result()
        return sum(self.tokens[id(data)] for data in batches)


def cpu_s(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(steps: int, rounds: int) -> dict:
    import psutil

    from tensafe_trainer.service.tinker.keys import create_key

    batches = make_batches(steps)
    ours_batches = [BatchData(**b) for b in batches]
    home = Path(tempfile.mkdtemp(prefix="tensafe-bench-tinker-"))
    api_key = create_key(home, "bench")
    trainer = LocalTrainer(home=home)
    client, server = psutil.Process(), psutil.Process(trainer.process.pid)
    runs: dict = {"ours": [], "theirs": []}
    cpu: dict = {name: {"client": 0.0, "server": 0.0} for name in runs}

    def round_of(name: str, loop, loop_batches) -> None:
        before = cpu_s(client), cpu_s(server)
        runs[name].append(timed(loop, loop_batches))
        cpu[name]["client"] += cpu_s(client) - before[0]
        cpu[name]["server"] += cpu_s(server) - before[1]

    try:
        with ServiceClient(base_url=trainer.base_url, api_key=trainer.token) as service:
            ours, theirs = SdkLoop(service), TinkerLoop(trainer.base_url, api_key)
            theirs_batches = [theirs.data(b) for b in batches]  # built once, like a prepared dataset
            for _ in range(2):  # warm-up: connections, allocator, the engines' first steps
                timed(ours, ours_batches)
                timed(theirs, theirs_batches)
            for i in range(rounds):  # alternate, and swap which goes first, so slow phases hit both alike
                order = [("theirs", theirs, theirs_batches), ("ours", ours, ours_batches)]
                for name, loop, loop_batches in (order if i % 2 else order[::-1]):
                    round_of(name, loop, loop_batches)
            theirs.service.close("success").result()
    finally:
        trainer.close()
    per_round = {name: {k: round(v / rounds, 3) for k, v in c.items()} for name, c in cpu.items()}
    return {"tg_tinker_tok_s": round(statistics.median(runs["ours"]), 1),
            "tinker_sdk_tok_s": round(statistics.median(runs["theirs"]), 1),
            **ratio_of_rounds(runs["theirs"], runs["ours"]), "steps_per_round": steps,
            "tokens_per_step": 8 * (SEQ - 1),
            # CPU outside the engine, per round: the clients' own and the server's (HTTP, conversion, futures)
            "cpu_s_per_round": {"tg_tinker": per_round["ours"], "tinker_sdk": per_round["theirs"]}}


def report(result: dict) -> None:
    report_ratio(result, ("tinker SDK /api/v1", "tg_tinker"), (result["tinker_sdk_tok_s"], result["tg_tinker_tok_s"]),
                 "goal >= 0.95")
    print(f"CPU s per round outside the engine: {result['cpu_s_per_round']}")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, steps=8, rounds=16)
