"""Prometheus metrics of the trainer (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
OPERATIONS = Counter("tensafe_operations_total", "Finished operations", ["type", "status"], registry=REGISTRY)
DURATION = Histogram("tensafe_operation_seconds", "Operation execution time", ["type"], registry=REGISTRY,
                     buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
TOKENS = Counter("tensafe_tokens_processed_total", "Label tokens processed by forward_backward", registry=REGISTRY)
QUEUE_DEPTH = Gauge("tensafe_queue_depth", "Operations waiting in all queues", registry=REGISTRY)
CLIENTS = Gauge("tensafe_clients", "Live clients", ["kind"], registry=REGISTRY)
SHARED_PASSES = Counter("tensafe_shared_pass_operations_total", "forward_backward operations that ran in one pass "
                        "with other clients' (passes with a DP client's part not counted)", registry=REGISTRY)
HOSTS = Gauge("tensafe_model_hosts", "Model host processes (a base model in memory each)", registry=REGISTRY)
DP_OPERATIONS = Counter("tensafe_dp_operations_total", "Finished operations of DP clients (no outcome or duration: "
                        "both depend on private batches)", ["type"], registry=REGISTRY)


def observe_private(op_type: str) -> None:
    DP_OPERATIONS.labels(op_type).inc()


def observe(op_type: str, status: str, seconds: float, tokens: int, shared: bool = False) -> None:
    OPERATIONS.labels(op_type, status).inc()
    if shared:
        SHARED_PASSES.inc()
    DURATION.labels(op_type).observe(seconds)
    if tokens:
        TOKENS.inc(tokens)
