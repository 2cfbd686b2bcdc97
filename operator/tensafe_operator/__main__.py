"""``python -m tensafe_operator [--namespace NS]...``: run the operator (all namespaces without one)."""

from __future__ import annotations

import argparse
import logging
import os

import kopf

from . import handlers  # noqa: F401  (registers the handlers)


def main() -> None:
    parser = argparse.ArgumentParser(prog="tensafe-operator", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="namespace to watch (repeatable; default: $TENSAFE_WATCH_NAMESPACE, "
                             "comma-separated, or all)")
    parser.add_argument("--liveness", default=os.environ.get("TENSAFE_LIVENESS"),
                        help="serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    namespaces = args.namespace or [n for n in os.environ.get("TENSAFE_WATCH_NAMESPACE", "").split(",") if n]
    os.environ["TENSAFE_WATCH_NAMESPACE"] = ",".join(namespaces)  # the status mirror lists these only
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kopf.run(standalone=True, namespaces=namespaces, clusterwide=not namespaces,
             liveness_endpoint=args.liveness)


if __name__ == "__main__":
    main()
