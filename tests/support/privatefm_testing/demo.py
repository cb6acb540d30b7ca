"""The main job, end to end on this machine (``scripts/demo.sh``):

1. start the local control plane (etcd, kube-apiserver, kube-controller-manager) and S3;
2. install the CRDs, the operator's RBAC and admission policies; publish a small base model to S3;
3. run the operator (under its ServiceAccount token) and the local pod runner;
4. apply the sample LearnerNamespace, upload the learner's adapter, request a merge;
5. show ``kubectl get lns,am -A``: a verified checkpoint v1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from privatefm_testing import seed
from privatefm_testing.cluster import BIN, LocalCluster, S3Info
from privatefm_testing.kube import Kube, token_kubeconfig
from privatefm_testing.operator_proc import OperatorProcess

REPO = Path(__file__).resolve().parents[3]


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


class Kubectl:
    def __init__(self, kubeconfig: str) -> None:
        self.env = {**os.environ, "KUBECONFIG": kubeconfig}

    def __call__(self, *args: str, input: str | None = None, show: bool = False) -> str:
        proc = subprocess.run([str(BIN / "kubectl"), *args], env=self.env, text=True, capture_output=True,
                              input=input, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        if show:
            print(proc.stdout, end="", flush=True)
        return proc.stdout

    def json(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self("get", *args, "-o", "json")))


def run(directory: Path, keep: bool) -> int:
    from privatefm_testing.podrunner import PodRunner

    step("starting etcd, kube-apiserver, kube-controller-manager and the S3 server on 127.0.0.1")
    cluster = LocalCluster(directory)
    state = cluster.start()
    s3: S3Info = state.s3
    kubectl = Kubectl(state.kubeconfig)
    operator: OperatorProcess | None = None
    runner: PodRunner | None = None
    try:
        print(f"    API server {state.server}, S3 {s3.endpoint} (bucket {s3.bucket})")
        step("installing the CRDs, the operator's namespace and RBAC, and the admission policies")
        kubectl("apply", "-k", str(REPO / "crds"), show=True)
        kubectl("apply", "-f", str(REPO / "manifests" / "namespace.yaml"), "-f",
                str(REPO / "manifests" / "rbac.yaml"), "-f", str(REPO / "manifests" / "admission.yaml"), show=True)
        Kube(Path(state.kubeconfig), directory).wait_established("learnernamespaces.privatefm.io",
                                                                 "adaptermerges.privatefm.io")

        step("publishing a small Llama-shaped base model to s3://…/base/tiny-llama/v1/")
        print("    " + seed.publish_base(s3.publisher.client(retries=3), s3.bucket, version=1))

        step("starting the operator (as its ServiceAccount) and the local pod runner")
        from kubernetes import config as kconfig

        runner = PodRunner(kconfig.new_client_from_config(state.kubeconfig), directory / "pods").start()
        token = kubectl("create", "token", "privatefm-operator", "-n", "privatefm-system", "--duration=24h").strip()
        token_config = token_kubeconfig(Path(state.kubeconfig), token, directory / "operator.kubeconfig")
        operator = OperatorProcess(token_config, s3, directory / "logs" / "operator.log", merge_gpus="0",
                                   resync_seconds="10")
        operator.start()
        print(f"    operator metrics at {operator.url}/metrics")

        step("applying manifests/samples/learnernamespace-minimal.yaml")
        kubectl("apply", "-f", str(REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml"), show=True)
        kubectl("wait", "--for=condition=Ready", "lns/learner-bo", "--timeout=120s", show=True)
        status = kubectl.json("lns", "learner-bo")["status"]
        namespace, ns_uid = status["namespace"], status["nsUid"]

        step(f"uploading the learner's LoRA adapter to learners/{ns_uid}/adapters/1/ and requesting a merge")
        print("    " + seed.publish_adapter(s3.client(), s3.bucket, ns_uid, 1))
        kubectl("create", "-f", "-", show=True, input=json.dumps({
            "apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
            "metadata": {"name": "manual-1", "namespace": namespace},
            "spec": {"trigger": "Manual", "reason": "demo"}}))
        deadline = time.monotonic() + 300
        phase = None
        while time.monotonic() < deadline:
            phase = (kubectl.json("am", "manual-1", "-n", namespace).get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(1)

        step("kubectl get lns,am -A")
        kubectl("get", "lns,am", "-A", show=True)
        current = (kubectl.json("lns", "learner-bo").get("status") or {}).get("currentCheckpoint")
        print("\ncurrentCheckpoint:", json.dumps(current, indent=2))
        if phase != "Succeeded" or not current:
            print("merge did not succeed:", json.dumps(kubectl.json("am", "manual-1", "-n", namespace).get("status"),
                                                       indent=2))
            return 1
        step(f"privatefm-merge verify {current['uri']}")
        verify = subprocess.run([os.path.join(os.path.dirname(sys.executable), "privatefm-merge"), "verify",
                                 current["uri"]], env={**os.environ, **s3.env()}, text=True)
        if keep:
            print(f"\nStill running; in another shell:\n  export KUBECONFIG={state.kubeconfig} PATH={BIN}:$PATH\n"
                  "Press Ctrl-C here to stop everything.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return verify.returncode
    finally:
        step("stopping the operator, the pod runner and the control plane")
        if operator:
            operator.stop()
        if runner:
            runner.stop()
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / ".run" / "demo")
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    args = parser.parse_args(argv)
    if args.dir.exists():
        import shutil

        LocalCluster(args.dir).stop()
        shutil.rmtree(args.dir)
    return run(args.dir.resolve(), args.keep)


if __name__ == "__main__":
    sys.exit(main())
