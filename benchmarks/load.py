"""Load on the local trainer: concurrent training clients, then a burst of 1,000 queued operations.

  (a) N training clients (threads) each run pipelined forward_backward + optim_step steps at once;
  (b) one client gets 1,000 operations queued as fast as the SDK can submit them;
  (c) hostile: (a) and (b) again, ``rounds`` times, each between two quiet runs of them, while another
      connection keeps sending oversized, chunked, malformed and unauthenticated requests (most with the
      token of a client of another tenant: what a hostile tenant can do), and on the Tinker door, with that
      tenant's Tinker key, the two body attacks of the door review (#27): 48 MiB JSON bodies to a control
      endpoint and 9 MiB forward_backward bodies naming no model.
Throughout, a Tinker model (the official SDK, another tenant) trains beside the /v1 clients: both doors'
legitimate throughput is measured.
Reports operations/s, p50/p99 latency from submission to resolved future, errors, dropped (futures
that never resolved) and reordered (optim_step results whose step does not follow submission order);
for (c) the legitimate clients' throughput with the attack over without it (same run), and the worst
``/healthz`` latency seen with and without it.

    python benchmarks/load.py [--clients 3] [--steps 20] [--burst 1000] [--rounds 3] [--json]
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
        except TGTinkerError as exc:
            outcome["errors"] += 1
            outcome["error_kinds"].append(f"/v1: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        latencies.append(time.perf_counter() - submitted)
        if future.type == "optim_step":
            steps.append(result.step)
    outcome["dropped"] += sum(1 for _, f in pending if not f.done())
    expected = list(range(start_step + 1, start_step + 1 + len(steps)))
    outcome["reordered"] += sum(1 for got, want in zip(steps, expected) if got != want)


def tinker_datums():
    from tinker import types

    return [types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                        loss_fn_inputs={"target_tokens": row[1:], "weights": [1.0] * (len(row) - 1)})
            for row in BATCH.input_ids]


def drive_tinker(model, done: threading.Event, rates: list, outcome: dict) -> None:
    """The Tinker door's legitimate client: forward_backward + optim_step pairs, each pair submitted at once, for
    as long as the /v1 clients' work lasts; its steps per second are appended to ``rates``."""
    from tinker import types

    datums, steps, start = tinker_datums(), 0, time.perf_counter()
    while not done.is_set():
        step = [model.forward_backward(datums, "cross_entropy"), model.optim_step(types.AdamParams(learning_rate=1e-3))]
        for future in step:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - any failure of a legitimate call is what is counted
                outcome["errors"] += 1
                outcome["error_kinds"].append(f"Tinker: {type(exc).__name__}: {str(exc)[:200]}")
        steps += 1
    rates.append(steps / (time.perf_counter() - start))


def workload(tcs, steps: int, burst: int, latencies: list, burst_latencies: list, outcome: dict, tinker_model,
             tinker_rates: list):
    done = threading.Event()
    tinker_client = threading.Thread(target=drive_tinker, args=(tinker_model, done, tinker_rates, outcome))
    tinker_client.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(tc, 2 * steps, latencies, outcome)) for tc in tcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent_s = time.perf_counter() - start
    start = time.perf_counter()
    drive(tcs[0], burst, burst_latencies, outcome)
    burst_s = time.perf_counter() - start
    done.set()
    tinker_client.join()
    return concurrent_s, burst_s


def hostile_bodies(token: str, client_id: str, tinker_key: str) -> list[tuple[str, bytes, dict]]:
    """What the attacker sends, in turn, built once (an attacker elsewhere pays for its own bytes; here
    its CPU is ours, so it should not spend it rebuilding them): each is refused (401, 413, 422 or 429)."""
    import json

    auth = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    operations = f"/v1/clients/{client_id}/operations"
    big_rows = {"request": {"type": "forward_backward", "batch": {"input_ids": [[1] * 16] * 5000}}}
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["a"] = {}
        node = node["a"]
    deep_save = {"submissions": [{"request": {"type": "save_state", "metadata": deep}}]}
    from tensafe_trainer.api.tinker import tinker_wire_pb2 as pb

    keyed = {"x-api-key": tinker_key, "content-type": "application/json"}
    no_model = pb.ForwardBackwardRequest(model_id="nobody:train:0", seq_id=1)
    for _ in range(128):
        datum = no_model.data.add()
        datum.model_input.add().encoded_text.tokens = b"\x01\x00\x00\x00" * (9 << 20 >> 9)
    return [("/api/v1/retrieve_future", b'{"request_id": "' + b"x" * (48 << 20) + b'"}', keyed),
            ("/api/v1/forward_backward", no_model.SerializeToString(),
             {**keyed, "content-type": "application/x-protobuf"}),
            ("/v1/training_clients", b"x" * (8 << 20), {}),  # no token
            (operations, b"x" * (12 << 20), {**auth, "transfer-encoding": "chunked"}),
            (operations, json.dumps(big_rows).encode(), auth),
            (f"{operations}/batch", json.dumps(deep_save).encode(), auth),
            (operations, b"{" * 100_000, auth)]


def attack(base_url: str, token: str, client_id: str, tinker_key: str, stop, statuses) -> None:
    """The attacker's process: hostile requests one after another on one connection at a time, until told
    to stop. It runs at the lowest priority: on this 2-core machine its own CPU would otherwise be charged
    to the server, which on a network it is not; the server's cost of refusing is counted in full."""
    import httpx

    os.nice(19)
    counts: dict = {}
    sent, started = 0, time.perf_counter()
    bodies = hostile_bodies(token, client_id, tinker_key)

    def chunks(body: bytes):
        for i in range(0, len(body), 1 << 20):
            yield body[i:i + (1 << 20)]

    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            for path, body, headers in bodies:
                chunked = headers.get("transfer-encoding") == "chunked"
                headers = {k: v for k, v in headers.items() if k != "transfer-encoding"}
                try:
                    status = client.post(path, content=chunks(body) if chunked else body, headers=headers).status_code
                except httpx.HTTPError:
                    status = 0  # the server closed on us: also a refusal
                counts[status] = counts.get(status, 0) + 1
                sent += 1
    counts["requests_per_s"] = round(sent / (time.perf_counter() - started), 1)
    counts["cpu_s"] = round(time.process_time(), 1)
    statuses.put(counts)


def health_prober(base_url: str, stop: threading.Event, worst: list) -> None:
    import httpx

    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get("/healthz")
            worst[0] = max(worst[0], time.perf_counter() - start)
            time.sleep(0.02)


def trainer_cpu_s(service) -> float:
    """CPU seconds the trainer (server and engines) has used so far."""
    import psutil

    server = psutil.Process(service.local_trainer.process.pid)
    total = 0.0
    for process in [server, *server.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(clients: int, steps: int, burst: int, rounds: int) -> dict:
    latencies: list[float] = []
    burst_latencies: list[float] = []
    outcome = {"errors": 0, "dropped": 0, "reordered": 0, "error_kinds": []}
    import tempfile

    import tinker

    from tensafe_trainer.service.tinker.keys import create_key

    home = Path(tempfile.mkdtemp(prefix="tensafe-load-"))
    tinker_keys = {tenant: create_key(home, tenant) for tenant in ("tinker-user", "intruder")}
    tinker_rates: dict = {"quiet": [], "attack": []}
    with ServiceClient(home=home) as service:
        tcs = [service.create_training_client(CONFIG) for _ in range(clients)]
        tinker_model = tinker.ServiceClient(base_url=service.base_url, api_key=tinker_keys["tinker-user"]) \
            .create_lora_training_client(base_model=MODEL, rank=4).result()
        # The intruder's own Tinker model: its forward_backward budget is then a model's, not a control call's.
        tinker.ServiceClient(base_url=service.base_url, api_key=tinker_keys["intruder"]) \
            .create_lora_training_client(base_model=MODEL, rank=4).result()
        # The attacker: a client of another tenant, with its own token, sending what is refused.
        with ServiceClient(service.base_url, service.transport.token, tenant_id="intruder") as admin:
            intruder = admin.create_training_client(CONFIG, client_id="intruder")
            intruder_token = intruder.transport.token
        concurrent_s, burst_s = workload(tcs, steps, burst, latencies, burst_latencies, outcome, tinker_model, [])
        server_cpu: dict = {"quiet": [], "attack": []}
        rates: list[tuple[str, float]] = []
        quiet_health, attack_seen = [0.0], {"health": [0.0], "statuses": {}}
        # Quiet and attacked phases alternate, each attacked one compared with the quiet ones either side:
        # single phases of this machine drift by ~10%, slowly.
        for phase in ["quiet"] + ["attack", "quiet"] * rounds:
            stop, worst = threading.Event(), [0.0]
            helpers = [threading.Thread(target=health_prober, args=(service.base_url, stop, worst))]
            attacker = None
            if phase == "attack":  # its own process: the attacker's CPU is real, its GIL is not ours
                ctx = multiprocessing.get_context("spawn")
                stop_flag, statuses = ctx.Event(), ctx.Queue()
                attacker = ctx.Process(target=attack, args=(service.base_url, intruder_token, intruder.id,
                                                            tinker_keys["intruder"], stop_flag, statuses))
                attacker.start()
            for h in helpers:
                h.start()
            cpu_before = trainer_cpu_s(service)
            spent = workload(tcs, steps, burst, [], [], outcome, tinker_model, tinker_rates[phase])
            stop.set()
            for h in helpers:
                h.join()
            if attacker is not None:
                stop_flag.set()
                for status, count in statuses.get(timeout=120).items():
                    seen = attack_seen["statuses"]
                    seen[status] = seen.get(status, 0) + count if status != "requests_per_s" else count
                attacker.join(timeout=60)
            rate = (clients * 2 * steps + burst) / sum(spent)
            server_cpu[phase].append(round(trainer_cpu_s(service) - cpu_before, 1))
            rates.append((phase, rate))
            seen = attack_seen["health"] if phase == "attack" else quiet_health
            seen[0] = max(seen[0], worst[0])
    ratios = [rates[i][1] / statistics.mean([rates[i - 1][1], rates[i + 1][1]])
              for i in range(1, len(rates) - 1, 2)]
    quiet_t, attack_t = tinker_rates["quiet"], tinker_rates["attack"]  # steps per second
    tinker_ratios = [attack_t[i] / statistics.mean([quiet_t[i], quiet_t[i + 1]]) for i in range(len(attack_t))]
    ordered = sorted(latencies + burst_latencies)
    total = clients * 2 * steps + burst

    def pct(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1) if ordered else 0.0

    return {"ops_per_s": round(total / (concurrent_s + burst_s), 1),
            "concurrent_ops_per_s": round(clients * 2 * steps / concurrent_s, 1),
            "burst_ops_per_s": round(burst / burst_s, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "burst_p50_ms": round(1000 * statistics.median(burst_latencies), 1) if burst_latencies else 0.0,
            "errors": outcome["errors"], "error_kinds": outcome["error_kinds"][:5], "dropped": outcome["dropped"], "reordered": outcome["reordered"],
            "operations": total, "clients": clients,
            "attack_ratio": round(statistics.median(ratios), 3), "attack_ratios": [round(r, 3) for r in ratios],
            "tinker_attack_ratio": round(statistics.median(tinker_ratios), 3),
            "tinker_attack_ratios": [round(r, 3) for r in tinker_ratios],
            "tinker_steps_per_s": {"quiet": [round(r, 2) for r in quiet_t], "attack": [round(r, 2) for r in attack_t]},
            "phase_ops_per_s": [(phase, round(rate, 1)) for phase, rate in rates],
            "worst_health_ms_attack": round(1000 * attack_seen["health"][0], 1),
            "worst_health_ms_quiet": round(1000 * quiet_health[0], 1),
            "trainer_cpu_s": server_cpu,
            "attack_statuses": {str(k): v for k, v in sorted(attack_seen["statuses"].items(), key=str)}}


def report(result: dict) -> None:
    print(f"{result['operations']} operations: {result['ops_per_s']} ops/s overall "
          f"({result['concurrent_ops_per_s']} with {result['clients']} clients at once, "
          f"{result['burst_ops_per_s']} in the burst)")
    print(f"latency submit->result: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms "
          f"(queued work included: a burst's last future waits for all before it)")
    print(f"errors {result['errors']}, dropped {result['dropped']}, reordered {result['reordered']}")
    for kind in result["error_kinds"]:
        print(f"  {kind}")
    print(f"phases (ops/s): {result['phase_ops_per_s']}")
    print(f"under attack vs quiet either side: median ratio {result['attack_ratio']} of {result['attack_ratios']} "
          f"(goal >= 0.9); the Tinker door's client: median {result['tinker_attack_ratio']} of "
          f"{result['tinker_attack_ratios']}; worst /healthz {result['worst_health_ms_attack']} ms "
          f"(quiet: {result['worst_health_ms_quiet']} ms); attacker's answers {result['attack_statuses']}; "
          f"trainer CPU s per phase {result['trainer_cpu_s']}")


if __name__ == "__main__":
    run_benchmark(__doc__, measure, report, clients=3, steps=20, burst=1000, rounds=3)
