"""Load on the local trainer: concurrent training clients, then a burst of 1,000 queued operations.

  (a) N training clients (threads) each run pipelined forward_backward + optim_step steps at once;
  (b) one client gets 1,000 operations queued as fast as the SDK can submit them.
Reports operations/s, p50/p99 latency from submission to resolved future, errors, dropped (futures
that never resolved) and reordered (optim_step results whose step does not follow submission order).

    python benchmarks/load.py [--clients 3] [--steps 20] [--burst 1000] [--json]
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_benchmark  # noqa: E402
from tg_tinker import BatchData, LoRAConfig, ServiceClient, TGTinkerError, TrainingConfig  # noqa: E402

MODEL = "tiny-random-llama:hidden=64,layers=2,heads=4,vocab=512,intermediate=128"
CONFIG = TrainingConfig(model_ref=MODEL, batch_size=4, max_seq_len=32, lora_config=LoRAConfig(rank=4))
BATCH = BatchData(input_ids=[[(7 * i + j) % 512 for j in range(16)] for i in range(4)])


def drive(tc, operations: int, latencies: list, outcome: dict) -> None:
    """Queue ``operations`` (alternating forward_backward / optim_step), then collect every future."""
    pending = []
    start_step = tc.step
    for i in range(operations):
        submitted = time.perf_counter()
        future = tc.forward_backward(BATCH) if i % 2 == 0 else tc.optim_step()
        pending.append((submitted, future))
    steps = []
    for submitted, future in pending:
        try:
            result = future.result(timeout=600)
        except TGTinkerError:
            outcome["errors"] += 1
            continue
        latencies.append(time.perf_counter() - submitted)
        if future.type == "optim_step":
            steps.append(result.step)
    outcome["dropped"] += sum(1 for _, f in pending if not f.done())
    expected = list(range(start_step + 1, start_step + 1 + len(steps)))
    outcome["reordered"] += sum(1 for got, want in zip(steps, expected) if got != want)


def measure(clients: int, steps: int, burst: int) -> dict:
    latencies: list[float] = []
    outcome = {"errors": 0, "dropped": 0, "reordered": 0}
    with ServiceClient() as service:
        tcs = [service.create_training_client(CONFIG) for _ in range(clients)]
        start = time.perf_counter()
        threads = [threading.Thread(target=drive, args=(tc, 2 * steps, latencies, outcome)) for tc in tcs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - start
        burst_latencies: list[float] = []
        start = time.perf_counter()
        drive(tcs[0], burst, burst_latencies, outcome)
        burst_s = time.perf_counter() - start
    ordered = sorted(latencies + burst_latencies)
    total = clients * 2 * steps + burst

    def pct(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1) if ordered else 0.0

    return {"ops_per_s": round(total / (concurrent_s + burst_s), 1),
            "concurrent_ops_per_s": round(clients * 2 * steps / concurrent_s, 1),
            "burst_ops_per_s": round(burst / burst_s, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "burst_p50_ms": round(1000 * statistics.median(burst_latencies), 1) if burst_latencies else 0.0,
            "errors": outcome["errors"], "dropped": outcome["dropped"], "reordered": outcome["reordered"],
            "operations": total, "clients": clients}


def report(result: dict) -> None:
    print(f"{result['operations']} operations: {result['ops_per_s']} ops/s overall "
          f"({result['concurrent_ops_per_s']} with {result['clients']} clients at once, "
          f"{result['burst_ops_per_s']} in the burst)")
    print(f"latency submit->result: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms "
          f"(queued work included: a burst's last future waits for all before it)")
    print(f"errors {result['errors']}, dropped {result['dropped']}, reordered {result['reordered']}")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, clients=3, steps=20, burst=1000)
