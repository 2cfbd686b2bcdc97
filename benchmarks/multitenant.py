"""One base model, many clients: LoRA clients sharing one model host vs an engine process per client.

Throughput (the tiny Llama of overhead.py: hidden 256, 4 layers, LoRA r16 on q/k/v/o; batches of 4 x 64 tokens,
the small batches of RL-style and DP runs): N = 1, 2, 4, 8 clients, each its own pipelined loop of
forward_backward + optim_step on a thread of its own, in (a) a trainer whose LoRA clients of one model share a
host (the default: one process, their ready forward_backwards in shared passes) and (b) a trainer started with
TENSAFE_HOST_ADAPTERS=1 (an engine process, and a copy of the model, per client: the behaviour before shared
hosts). Rounds alternate a/b; the ratio is aggregate tokens/s of (a) over (b), the median of the rounds' ratios.

DP inside a shared host (dp.py's setup, batches of 8 x 128): a DP client's tokens/s over a plain client's, each
training alone on the same shared host, rounds alternating (dp.py measures the same ratio in-process).

Memory (SmolLM2-135M): the resident memory of the trainer's engine processes (the sum of their RSS) with 8
clients on one host vs 1 client, and with 8 clients each in a process of its own. Start: seconds from
create_training_client until the client is READY, and until its first forward_backward's result, for the first
client of a model (a model load) and for a client joining a warm host.

On a GPU machine the same script is the GPU row: models go to CUDA (bf16) by default, and the GPU memory of the
engine processes (nvidia-smi) is reported beside their RSS.

    python benchmarks/multitenant.py [--steps 6] [--rounds 4] [--json]
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

from common import median_interval, run_benchmark  # noqa: E402
from tg_tinker import BatchData, DPConfig, LoRAConfig, OptimizerConfig, ServiceClient, TrainingConfig  # noqa: E402

TINY = "tiny-random-llama:hidden=256,layers=4"
SMOLLM2 = "smollm2-135m"
ROWS, SEQ, VOCAB = 4, 64, 4096
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
COUNTS = (1, 2, 4, 8)


def config(model: str, rows: int = ROWS, seq: int = SEQ, dp: bool = False) -> TrainingConfig:
    return TrainingConfig(model_ref=model, lora_config=LoRAConfig(rank=16, alpha=32, target_modules=TARGETS),
                          optimizer=OptimizerConfig(learning_rate=1e-4), batch_size=rows, max_seq_len=seq,
                          dp_config=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0) if dp else None)


def batches(n: int, seed: int, vocab: int = VOCAB, rows: int = ROWS, seq: int = SEQ) -> list[BatchData]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [[rng.randrange(vocab) for _ in range(seq)] for _ in range(rows)]
        out.append(BatchData(input_ids=ids, labels=[row[1:] + [-100] for row in ids]))
    return out


@contextlib.contextmanager
def trainer(host_adapters: int):
    """A local trainer whose hosts carry at most ``host_adapters`` clients (1: a process per client)."""
    os.environ["TENSAFE_HOST_ADAPTERS"] = str(host_adapters)
    try:
        with ServiceClient(home=tempfile.mkdtemp(prefix="tensafe-bench-multitenant-")) as service:
            yield service
    finally:
        os.environ.pop("TENSAFE_HOST_ADAPTERS", None)


def engine_processes(service: ServiceClient) -> list[psutil.Process]:
    server = psutil.Process(service.local_trainer.process.pid)
    return [child for child in server.children()
            if "multiprocessing" in " ".join(child.cmdline()) and "resource_tracker" not in " ".join(child.cmdline())]


def engines_rss(service: ServiceClient) -> int:
    """The summed RSS of the trainer's engine (host) processes."""
    return sum(p.memory_info().rss for p in engine_processes(service))


def engines_gpu_mib(service: ServiceClient) -> Optional[int]:
    """On a GPU machine (models are placed on CUDA by default there): the GPU memory of the engine processes."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    pids = {p.pid for p in engine_processes(service)}
    return sum(int(used) for pid, used in (line.split(",") for line in out.splitlines() if line.strip())
               if int(pid) in pids)


def aggregate(clients, work: list[list[BatchData]]) -> float:
    """Each client trains on its batches in a pipelined loop of its own, all at once: tokens/s of all of them."""
    tokens = [0] * len(clients)

    def loop(i: int) -> None:
        futures = []
        for batch in work[i]:
            futures.append(clients[i].forward_backward(batch))
            last = clients[i].optim_step()
        last.result()
        tokens[i] = sum(f.result().tokens_processed for f in futures)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(clients))]
    time.sleep(0.1)  # idle OpenMP workers of the last round go to sleep first
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - start)


def start_seconds(service: ServiceClient, model: str, batch: BatchData):
    """The client, seconds until it is READY, and until its first forward_backward's result."""
    start = time.perf_counter()
    tc = service.create_training_client(config(model))
    ready = time.perf_counter() - start
    tc.forward_backward(batch).result()
    return tc, round(ready, 3), round(time.perf_counter() - start, 3)


def measure_throughput(steps: int, rounds: int) -> dict:
    work = [batches(steps, seed=i) for i in range(max(COUNTS))]
    runs = {n: {"shared": [], "separate": []} for n in COUNTS}
    with trainer(max(COUNTS)) as shared_service, trainer(1) as separate_service:
        shared = [shared_service.create_training_client(config(TINY)) for _ in range(max(COUNTS))]
        separate = [separate_service.create_training_client(config(TINY)) for _ in range(max(COUNTS))]
        aggregate(shared, work)  # warm-up
        aggregate(separate, work)
        for i in range(rounds):
            for n in COUNTS:
                order = [("shared", shared), ("separate", separate)]
                for name, clients in (order if i % 2 == 0 else order[::-1]):
                    runs[n][name].append(aggregate(clients[:n], work[:n]))
    out = {}
    for n in COUNTS:
        ratios = [a / b for a, b in zip(runs[n]["shared"], runs[n]["separate"])]
        out[n] = {"shared_tok_s": round(statistics.median(runs[n]["shared"]), 1),
                  "separate_tok_s": round(statistics.median(runs[n]["separate"]), 1),
                  "ratio": round(statistics.median(ratios), 3),
                  "ratio_ci95": [round(r, 3) for r in median_interval(ratios)]}
    return out


def measure_dp(steps: int, rounds: int) -> dict:
    work = batches(steps, seed=7, rows=8, seq=128)
    dp_runs, plain_runs = [], []
    with trainer(8) as service:
        private = service.create_training_client(config(TINY, rows=8, seq=128, dp=True))
        plain = service.create_training_client(config(TINY, rows=8, seq=128))
        aggregate([private], [work])  # warm-up
        aggregate([plain], [work])
        for i in range(rounds):
            order = [(dp_runs, private), (plain_runs, plain)]
            for runs, client in (order if i % 2 == 0 else order[::-1]):
                runs.append(aggregate([client], [work]))
    ratios = [a / b for a, b in zip(dp_runs, plain_runs)]
    return {"dp_tok_s": round(statistics.median(dp_runs), 1), "plain_tok_s": round(statistics.median(plain_runs), 1),
            "ratio": round(statistics.median(ratios), 3), "ratio_ci95": [round(r, 3) for r in median_interval(ratios)]}


def measure_memory() -> dict:
    batch = batches(1, seed=99, vocab=49152)[0]
    out = {}
    with trainer(8) as service:
        first, out["cold_ready_s"], out["cold_first_result_s"] = start_seconds(service, SMOLLM2, batch)
        out["one_client_mib"] = engines_rss(service) >> 20
        out["one_client_gpu_mib"] = engines_gpu_mib(service)
        second, out["warm_ready_s"], out["warm_first_result_s"] = start_seconds(service, SMOLLM2, batch)
        others = [service.create_training_client(config(SMOLLM2)) for _ in range(6)]
        for tc in others:
            tc.forward_backward(batch).result()
        out["eight_clients_one_host_mib"] = engines_rss(service) >> 20
        out["eight_clients_one_host_gpu_mib"] = engines_gpu_mib(service)
    with trainer(1) as service:
        clients = [service.create_training_client(config(SMOLLM2)) for _ in range(8)]
        for tc in clients:
            tc.forward_backward(batch).result()
        out["eight_processes_mib"] = engines_rss(service) >> 20
        out["eight_processes_gpu_mib"] = engines_gpu_mib(service)
    return out


def measure(steps: int, rounds: int) -> dict:
    throughput = measure_throughput(steps, rounds)
    dp = measure_dp(steps, 2 * rounds)
    memory = measure_memory()
    return {"throughput": throughput, "dp_in_shared_host": dp, "memory": memory,
            "memory_ratio": round(memory["eight_clients_one_host_mib"] / memory["one_client_mib"], 3),
            "throughput_ratio": throughput[max(COUNTS)]["ratio"], "steps_per_client": steps, "rounds": rounds}


def report(result: dict) -> None:
    print(f"aggregate tokens/s, {ROWS}x{SEQ} batches, tiny Llama (median of {result['rounds']} rounds):")
    print("  clients   shared host   a process each   ratio (95% interval)")
    for n, row in result["throughput"].items():
        low, high = row["ratio_ci95"]
        print(f"  {n:>7}   {row['shared_tok_s']:>11.1f}   {row['separate_tok_s']:>14.1f}   "
              f"{row['ratio']:.3f} ({low:.3f}-{high:.3f})")
    d = result["dp_in_shared_host"]
    print(f"DP client / plain client on a shared host (8x128): {d['ratio']:.3f} "
          f"({d['ratio_ci95'][0]:.3f}-{d['ratio_ci95'][1]:.3f}); {d['dp_tok_s']} vs {d['plain_tok_s']} tok/s")
    m = result["memory"]
    print(f"SmolLM2-135M engines' RSS: 1 client {m['one_client_mib']} MiB; 8 on one host "
          f"{m['eight_clients_one_host_mib']} MiB (memory_ratio {result['memory_ratio']}; goal <= 1.5); "
          f"8 in a process each {m['eight_processes_mib']} MiB")
    if m.get("one_client_gpu_mib") is not None:
        print(f"GPU memory of the engines: 1 client {m['one_client_gpu_mib']} MiB; 8 on one host "
              f"{m['eight_clients_one_host_gpu_mib']} MiB; 8 in a process each {m['eight_processes_gpu_mib']} MiB")
    print(f"a new client READY: cold host {m['cold_ready_s']:.2f} s, warm host {m['warm_ready_s']:.2f} s; its first "
          f"result: {m['cold_first_result_s']:.2f} s, {m['warm_first_result_s']:.2f} s")
    print(f"throughput_ratio (8 clients, shared / separate): {result['throughput_ratio']} (goal >= 1.3)")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, steps=6, rounds=4)
