"""``tensafe dev-cluster``: the test cluster in the foreground, for people as well as tests."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from tensafe_operator.crd import all_crds
from .cluster import DevCluster
from .store import CRD_KEY


def run(args) -> int:
    root = args.root or Path(tempfile.mkdtemp(prefix="tensafe-devcluster-"))
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TENSAFE_MODEL_CACHE", "HF_HOME") if k in os.environ}
    cluster = DevCluster(root, port=args.port, operator=not args.no_operator, extra_env=env, gpus=args.gpus)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with cluster:
        for crd in all_crds().values():
            cluster.call(cluster.store.create, CRD_KEY, "", crd)
        args.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cluster.kubeconfig_path, args.kubeconfig)
        os.chmod(args.kubeconfig, 0o600)
        operator = "with the operator (log: %s)" % (root / "operator.log") if not args.no_operator else "no operator"
        print(f"TenSafe dev cluster at {cluster.server_url}, {operator}; CRDs installed.\n"
              f"  export KUBECONFIG={args.kubeconfig}\n"
              f"  kubectl apply -f examples/dev/trainingclient.yaml && kubectl get tc\n"
              f"Pods run as local processes on 127.0.0.x; their logs are in {root / 'logs'}. Ctrl-C stops it.",
              flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0
