"""``make demo-kube``: the Kubernetes path end to end, on the dev cluster, as a newcomer would walk it.

Starts the dev cluster with the CRDs and the operator, applies ``examples/dev/trainingclient.yaml`` with
kubectl, waits for READY, trains a few DP-SGD steps through the SDK's kubernetes backend, saves a
checkpoint through a TrainingOperation, prints ``kubectl get tc,tops,pods``, and stops the cluster.

    python -m tensafe_devcluster.demo [--steps 5] [--keep-root]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tensafe_operator.crd import all_crds

from .cluster import DevCluster
from .store import CRD_KEY

ROOT = Path(__file__).resolve().parents[3]  # the repository: tests/support/tensafe_devcluster/demo.py
EXAMPLE = ROOT / "examples" / "dev" / "trainingclient.yaml"
NAME = "hello-tensafe"


def kubectl_binary() -> str:
    return shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl") or "kubectl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--keep-root", action="store_true", help="keep the cluster's folder (logs, volumes)")
    args = parser.parse_args(argv)
    from tg_tinker import ServiceClient, verify_receipt

    root = Path(tempfile.mkdtemp(prefix="tensafe-demo-kube-"))
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TENSAFE_MODEL_CACHE", "HF_HOME") if k in os.environ}
    with DevCluster(root, operator=True, extra_env=env) as cluster:
        for crd in all_crds().values():
            cluster.call(cluster.store.create, CRD_KEY, "", crd)
        kube_env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig_path))

        def kubectl(*words: str) -> None:
            print("$ kubectl " + " ".join(words), flush=True)
            subprocess.run([kubectl_binary(), *words], env=kube_env, check=True, timeout=600)

        print(f"dev cluster at {cluster.server_url} (CRDs and operator installed; logs in {root})", flush=True)
        kubectl("apply", "-f", str(EXAMPLE))
        kubectl("wait", "--for=jsonpath={.status.phase}=READY", f"tc/{NAME}", "--timeout=300s")
        with ServiceClient(backend="kubernetes", namespace="default", kubeconfig=str(cluster.kubeconfig_path),
                           delete_on_close=False) as service:
            tc = service.get_training_client(NAME)
            rng = random.Random(0)
            vocab = 512  # the example's tiny model
            for _ in range(args.steps):
                batch = [[rng.randrange(vocab) for _ in range(32)] for _ in range(tc.config.batch_size)]
                loss = tc.forward_backward({"input_ids": batch})
                step = tc.optim_step().result()
                print(f"step {step.step}: loss {loss.result().loss:.4f}, epsilon so far "
                      f"{step.dp_metrics.total_epsilon:.3f}", flush=True)
            saved = tc.save_state()  # on Kubernetes also a TrainingOperation, resolved from its status
            claims = verify_receipt(saved.receipt, service.receipt_public_key())
            print(f"checkpoint {saved.artifact_id} at step {saved.step}: AES-256-GCM, receipt verified "
                  f"(epsilon {claims['total_epsilon']:.3f})", flush=True)
        # The operator mirrors step and epsilon into the status every few seconds.
        kubectl("wait", f"--for=jsonpath={{.status.step}}={saved.step}", f"tc/{NAME}", "--timeout=60s")
        kubectl("get", "tc,tops,pods")
    print("dev cluster stopped", flush=True)
    if not args.keep_root:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
