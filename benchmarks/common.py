"""What every benchmark script shares: integer options, --json, and a report in words otherwise."""

from __future__ import annotations

import argparse
import json
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
