"""What every benchmark script shares: integer options, --json, and a report in words otherwise."""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable


def run_benchmark(doc: str, measure: Callable[..., dict], report: Callable[[dict], None], **options: int) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in options.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = measure(**{name: getattr(args, name) for name in options})
    if args.json:
        print(json.dumps(result))
    else:
        report(result)


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval for the median: the order statistics whose ranks lie
    z standard deviations of a Binomial(n, 1/2) either side of n/2."""
    ordered, n = sorted(values), len(values)
    half = z * n ** 0.5 / 2
    low, high = max(0, int(n / 2 - half)), min(n - 1, int(n / 2 + half + 0.5))
    return ordered[low], ordered[high]


def ratio_of_rounds(measured: list[float], baseline: list[float]) -> dict:
    """Rounds run alternately: the median of the per-round ratios, its 95% interval, and the rounds."""
    ratios = [m / b for m, b in zip(measured, baseline)]
    return {"ratio": round(statistics.median(ratios), 4),
            "ratio_ci95": [round(r, 4) for r in median_interval(ratios)],
            "round_ratios": [round(r, 3) for r in ratios], "rounds": len(ratios)}


def report_ratio(result: dict, names: tuple[str, str], speeds: tuple[float, float], goal: str) -> None:
    """Two throughputs and their ratio, in words."""
    width = max(len(n) for n in names) + 1
    print(f"{names[1]:<{width}}: {speeds[1]:9.1f} tok/s (median of {result['rounds']} rounds)")
    print(f"{names[0]:<{width}}: {speeds[0]:9.1f} tok/s")
    low, high = result["ratio_ci95"]
    print(f"{'ratio':<{width}}: {result['ratio']:.3f} (95% interval {low:.3f}-{high:.3f}; {goal})")
    print(f"{'per-round ratios':<{width}}: {result['round_ratios']}")
