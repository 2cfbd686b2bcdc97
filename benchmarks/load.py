"""Load on the local trainer: concurrent training clients, then a burst of 1,000 queued operations.

  (a) N training clients (threads) each run pipelined forward_backward + optim_step steps at once;
  (b) one client gets 1,000 operations queued as fast as the SDK can submit them;
  (c) hostile: (a) and (b) again, between two quiet runs of them, while another connection keeps sending
      oversized, chunked, malformed and unauthenticated requests (a client's token for some of them).
Reports operations/s, p50/p99 latency from submission to resolved future, errors, dropped (futures
that never resolved) and reordered (optim_step results whose step does not follow submission order);
for (c) the legitimate clients' throughput with the attack over without it (same run), and the worst
``/healthz`` latency seen with and without it.

    python benchmarks/load.py [--clients 3] [--steps 20] [--burst 1000] [--json]
"""

from __future__ import annotations

import multiprocessing
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


def workload(tcs, steps: int, burst: int, latencies: list, burst_latencies: list, outcome: dict):
    start = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(tc, 2 * steps, latencies, outcome)) for tc in tcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent_s = time.perf_counter() - start
    start = time.perf_counter()
    drive(tcs[0], burst, burst_latencies, outcome)
    return concurrent_s, time.perf_counter() - start


def hostile_requests(base_url: str, token: str, client_id: str):
    """What the attacker sends, in turn: each refused at the door (401, 413 or 422)."""
    import httpx

    auth = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    big_rows = {"request": {"type": "forward_backward", "batch": {"input_ids": [[1] * 16] * 5000}}}
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["a"] = {}
        node = node["a"]

    def chunked():
        for _ in range(12):
            yield b"x" * (1 << 20)

    with httpx.Client(base_url=base_url, timeout=60) as client:
        while True:
            for send in (
                lambda: client.post("/v1/training_clients", content=b"x" * (8 << 20)),  # no token
                lambda: client.post(f"/v1/clients/{client_id}/operations", content=chunked(), headers=auth),
                lambda: client.post(f"/v1/clients/{client_id}/operations", json=big_rows, headers=auth),
                lambda: client.post(f"/v1/clients/{client_id}/operations/batch", headers=auth,
                                    json={"submissions": [{"request": {"type": "save_state", "metadata": deep}}]}),
                lambda: client.post(f"/v1/clients/{client_id}/operations", content=b"{" * 100_000, headers=auth),
            ):
                try:
                    yield send().status_code
                except httpx.HTTPError:
                    yield 0  # the server closed on us: also a refusal


def attack(base_url: str, token: str, client_id: str, stop, statuses) -> None:
    """The attacker's process: hostile requests one after another until told to stop."""
    counts: dict = {}
    for status in hostile_requests(base_url, token, client_id):
        counts[status] = counts.get(status, 0) + 1
        if stop.is_set():
            break
    statuses.put(counts)


def health_prober(base_url: str, stop: threading.Event, worst: list) -> None:
    import httpx

    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get("/healthz")
            worst[0] = max(worst[0], time.perf_counter() - start)
            time.sleep(0.02)


def measure(clients: int, steps: int, burst: int) -> dict:
    latencies: list[float] = []
    burst_latencies: list[float] = []
    outcome = {"errors": 0, "dropped": 0, "reordered": 0}
    with ServiceClient() as service:
        tcs = [service.create_training_client(CONFIG) for _ in range(clients)]
        concurrent_s, burst_s = workload(tcs, steps, burst, latencies, burst_latencies, outcome)
        quiet_rates, quiet_health, attack_seen = [], [0.0], {"rate": 0.0, "health": [0.0], "statuses": {}}
        for phase in ("quiet", "attack", "quiet"):
            stop, worst = threading.Event(), [0.0]
            helpers = [threading.Thread(target=health_prober, args=(service.base_url, stop, worst))]
            attacker = None
            if phase == "attack":  # its own process: the attacker's CPU is real, its GIL is not ours
                ctx = multiprocessing.get_context("spawn")
                stop_flag, statuses = ctx.Event(), ctx.Queue()
                token = service._clients[tcs[-1].id].token  # one legitimate client's token, misused
                attacker = ctx.Process(target=attack, args=(service.base_url, token, tcs[-1].id, stop_flag, statuses))
                attacker.start()
            for h in helpers:
                h.start()
            spent = workload(tcs, steps, burst, [], [], outcome)
            stop.set()
            for h in helpers:
                h.join()
            if attacker is not None:
                stop_flag.set()
                attack_seen["statuses"] = statuses.get(timeout=120)
                attacker.join(timeout=60)
            rate = (clients * 2 * steps + burst) / sum(spent)
            if phase == "attack":
                attack_seen["rate"], attack_seen["health"] = rate, worst
            else:
                quiet_rates.append(rate)
                quiet_health[0] = max(quiet_health[0], worst[0])
    ordered = sorted(latencies + burst_latencies)
    total = clients * 2 * steps + burst

    def pct(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1) if ordered else 0.0

    return {"ops_per_s": round(total / (concurrent_s + burst_s), 1),
            "concurrent_ops_per_s": round(clients * 2 * steps / concurrent_s, 1),
            "burst_ops_per_s": round(burst / burst_s, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "burst_p50_ms": round(1000 * statistics.median(burst_latencies), 1) if burst_latencies else 0.0,
            "errors": outcome["errors"], "dropped": outcome["dropped"], "reordered": outcome["reordered"],
            "operations": total, "clients": clients,
            "attack_ratio": round(attack_seen["rate"] / statistics.mean(quiet_rates), 3),
            "quiet_ops_per_s": [round(r, 1) for r in quiet_rates], "attack_ops_per_s": round(attack_seen["rate"], 1),
            "worst_health_ms_attack": round(1000 * attack_seen["health"][0], 1),
            "worst_health_ms_quiet": round(1000 * quiet_health[0], 1),
            "attack_statuses": {str(k): v for k, v in sorted(attack_seen["statuses"].items())}}


def report(result: dict) -> None:
    print(f"{result['operations']} operations: {result['ops_per_s']} ops/s overall "
          f"({result['concurrent_ops_per_s']} with {result['clients']} clients at once, "
          f"{result['burst_ops_per_s']} in the burst)")
    print(f"latency submit->result: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms "
          f"(queued work included: a burst's last future waits for all before it)")
    print(f"errors {result['errors']}, dropped {result['dropped']}, reordered {result['reordered']}")
    print(f"under attack: {result['attack_ops_per_s']} ops/s vs {result['quiet_ops_per_s']} quiet before and after: "
          f"ratio {result['attack_ratio']} (goal >= 0.9); worst /healthz {result['worst_health_ms_attack']} ms "
          f"(quiet: {result['worst_health_ms_quiet']} ms); attacker's answers {result['attack_statuses']}")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, clients=3, steps=20, burst=1000)
