"""The main job, end to end on this machine (``scripts/demo.sh``).

On a real node (the default, ``--pods=node``):

1. start the local control plane, MinIO and a node (containerd, runc, kubelet, kube-scheduler),
   building the operator and merge images from the Dockerfiles when they changed;
2. publish a small base model to S3 (as the publisher); ``helm install`` the chart: the operator
   runs as the chart's StatefulSet, a real pod in the operator image, with its probes;
3. apply the sample LearnerNamespace, upload the learner's adapter, request a merge: a real merge
   pod in the merge image, restricted, as uid 65532; then let the CronJob fire a scheduled merge;
4. show ``kubectl get lns,am -A`` (verified v1 and v2), ``kubectl logs`` of the merge pod, and
   ``privatefm-merge verify`` of the current checkpoint.

``--pods=process`` is the quick lane with no container runtime: the operator runs as a local
process under its ServiceAccount token and the pod runner runs merge pods as local processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from privatefm_testing import seed
from privatefm_testing.cluster import BIN, ClusterState, LocalCluster, S3Info
from privatefm_testing.kube import Kube, token_kubeconfig
from privatefm_testing.operator_proc import OperatorProcess

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "privatefm-operator"
SYSTEM, RELEASE = "privatefm-system", "privatefm-operator"


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


def chart_values(state: ClusterState) -> dict[str, Any]:
    """Values for ``helm install`` on the local node: the local images (never pulled), the store keys
    in an existing Secret, and small merge pods (this machine has two cores). No kube-proxy runs, so
    the operator's pod is pointed at the API server's address."""
    assert state.node is not None
    images = state.node["images"]
    host, port = state.server.removeprefix("https://").rsplit(":", 1)
    repo, tag = images["operator"].rsplit(":", 1)
    merge_repo, merge_tag = images["merge"].rsplit(":", 1)
    return {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "mergeImage": {"repository": merge_repo, "tag": merge_tag, "pullPolicy": "Never"},
        "s3": {"endpoint": state.s3.endpoint, "bucket": state.s3.bucket, "existingSecret": "privatefm-store-keys"},
        "merge": {"gpus": 0, "cpu": "500m", "memory": "2Gi"},
        "resyncSeconds": 5,
        # Probe answers sooner than the chart's defaults, so that a stuck operator is restarted in
        # seconds here (tests/test_demo.py freezes it).
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http-metrics"}, "initialDelaySeconds": 5,
                          "periodSeconds": 3, "timeoutSeconds": 2, "failureThreshold": 2},
        "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": host},
                     {"name": "KUBERNETES_SERVICE_PORT", "value": port}],
    }


def install_chart(state: ClusterState, kubectl: Kubectl, directory: Path) -> None:
    """The operator as a platform team installs it: its namespace (Pod Security restricted), the
    store keys in a Secret of its own, then the chart (CRDs, RBAC, admission policies, StatefulSet)."""
    s3 = state.s3
    kubectl("create", "namespace", SYSTEM, show=True)
    kubectl("label", "namespace", SYSTEM, "pod-security.kubernetes.io/enforce=restricted", show=True)
    kubectl("-n", SYSTEM, "create", "secret", "generic", "privatefm-store-keys",
            f"--from-literal=accessKey={s3.operator.access_key}", f"--from-literal=secretKey={s3.operator.secret_key}")
    values = directory / "values.yaml"
    values.write_text(yaml.safe_dump(chart_values(state)))
    helm = subprocess.run([str(BIN / "helm"), "install", RELEASE, str(CHART), "--namespace", SYSTEM, "-f", str(values),
                           "--wait", "--timeout", "240s"], env=kubectl.env, text=True, capture_output=True)
    if helm.returncode != 0:
        print(kubectl("-n", SYSTEM, "get", "pods,events"), file=sys.stderr)
        raise SystemExit(f"helm install failed:\n{helm.stderr}")
    print("\n".join(helm.stdout.splitlines()[:6]))
    kubectl("apply", "-f", str(REPO / "manifests" / "people-roles.yaml"))


def wait_phase(kubectl: Kubectl, namespace: str, name: str, timeout: float = 300) -> str | None:
    deadline = time.monotonic() + timeout
    phase = None
    while time.monotonic() < deadline:
        phase = (kubectl.json("am", name, "-n", namespace).get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    return phase


def scheduled_merge(kubectl: Kubectl, learner: str, namespace: str, timeout: float = 180) -> dict[str, Any] | None:
    """Lets the learner's CronJob fire once (schedule every minute), waits for the AdapterMerge the
    operator pairs with its Job, then puts the nightly schedule back."""
    nightly = kubectl.json("lns", learner)["spec"].get("merge", {}).get("schedule")
    kubectl("patch", "lns", learner, "--type=merge", "-p", json.dumps({"spec": {"merge": {"schedule": "* * * * *"}}}))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for am in kubectl.json("am", "-n", namespace)["items"]:
                if am["spec"].get("trigger") == "Scheduled" and (am.get("status") or {}).get("phase") in (
                        "Succeeded", "Failed"):
                    return dict(am)
            time.sleep(2)
        return None
    finally:
        kubectl("patch", "lns", learner, "--type=merge", "-p", json.dumps({"spec": {"merge": {"schedule": nightly}}}))


def run(directory: Path, keep: bool, pods: str, leave_running: bool = False) -> int:
    node = pods == "node"
    step("starting etcd, kube-apiserver, kube-controller-manager and the S3 server"
         + (", and a node: containerd, runc, kubelet, kube-scheduler (building the images if they changed)"
            if node else " on 127.0.0.1"))
    cluster = LocalCluster(directory, node=node)
    state = cluster.start()
    s3: S3Info = state.s3
    kubectl = Kubectl(state.kubeconfig)
    operator: OperatorProcess | None = None
    runner: Any = None
    try:
        print(f"    API server {state.server}, S3 {s3.endpoint} (bucket {s3.bucket})")
        if state.node:
            print(f"    node {state.node['name']}, images: " + ", ".join(state.node["images"].values()))
        step("publishing a small Llama-shaped base model to s3://…/base/tiny-llama/v1/ (as the publisher)")
        print("    " + seed.publish_base(s3.publisher.client(retries=3), s3.bucket, version=1))

        if node:
            step("helm install privatefm-operator: the operator runs as the chart's StatefulSet on the node")
            install_chart(state, kubectl, directory)
            kubectl("-n", SYSTEM, "get", "statefulset,pods", "-o", "wide", show=True)
        else:
            operator, runner = start_operator_process(state, kubectl, directory)

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
        phase = wait_phase(kubectl, namespace, "manual-1")
        scheduled = None
        if node and phase == "Succeeded":
            step("kubectl logs job/manual-1 (the merge pod's progress)")
            kubectl("logs", "-n", namespace, "job/manual-1", show=True)
            step("a scheduled merge: the learner's CronJob fires (schedule set to every minute for the demo)")
            scheduled = scheduled_merge(kubectl, "learner-bo", namespace)
            print(f"    {scheduled['metadata']['name']}: {scheduled['status']['phase']}" if scheduled
                  else "    no scheduled merge finished in time")

        step("kubectl get lns,am -A")
        kubectl("get", "lns,am", "-A", show=True)
        current = (kubectl.json("lns", "learner-bo").get("status") or {}).get("currentCheckpoint")
        print("\ncurrentCheckpoint:", json.dumps(current, indent=2))
        if phase != "Succeeded" or not current or (node and (scheduled or {}).get("status", {}).get(
                "phase") != "Succeeded"):
            print("merge did not succeed:", json.dumps(kubectl.json("am", "-n", namespace).get("items"), indent=2))
            return 1
        step(f"privatefm-merge verify {current['uri']}")
        verify = subprocess.run([os.path.join(os.path.dirname(sys.executable), "privatefm-merge"), "verify",
                                 current["uri"]], env={**os.environ, **s3.env()}, text=True)
        if keep or leave_running:
            print(f"\nStill running; in another shell:\n  export KUBECONFIG={state.kubeconfig} PATH={BIN}:$PATH\n"
                  f"Stop it with: privatefm-cluster down --dir {directory}", flush=True)
        if keep and not leave_running:
            print("Press Ctrl-C here to stop everything.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return verify.returncode
    finally:
        if not leave_running:
            step("stopping everything" + (" and putting the machine back as it was" if node else ""))
            if operator:
                operator.stop()
            if runner:
                runner.stop()
            left = cluster.stop()
            if left:
                print("left behind: " + "; ".join(left), file=sys.stderr)


def start_operator_process(state: ClusterState, kubectl: Kubectl, directory: Path) -> tuple[OperatorProcess, Any]:
    """The quick lane: CRDs, RBAC and policies from manifests/, the operator as a local process under
    its ServiceAccount token, and the pod runner in place of a node."""
    from kubernetes import config as kconfig

    from privatefm_testing.podrunner import PodRunner

    step("installing the CRDs, the operator's namespace and RBAC, and the admission policies")
    kubectl("apply", "-k", str(REPO / "crds"), show=True)
    kubectl("apply", "-f", str(REPO / "manifests" / "namespace.yaml"), "-f",
            str(REPO / "manifests" / "rbac.yaml"), "-f", str(REPO / "manifests" / "admission.yaml"), show=True)
    Kube(Path(state.kubeconfig), directory).wait_established("learnernamespaces.privatefm.io",
                                                             "adaptermerges.privatefm.io")
    step("starting the operator (as its ServiceAccount) and the local pod runner")
    runner = PodRunner(kconfig.new_client_from_config(state.kubeconfig), directory / "pods").start()
    token = kubectl("create", "token", "privatefm-operator", "-n", SYSTEM, "--duration=24h").strip()
    token_config = token_kubeconfig(Path(state.kubeconfig), token, directory / "operator.kubeconfig")
    operator = OperatorProcess(token_config, state.s3, directory / "logs" / "operator.log", merge_gpus="0",
                               resync_seconds="10")
    operator.start()
    print(f"    operator metrics at {operator.url}/metrics")
    return operator, runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=REPO / ".run" / "demo")
    parser.add_argument("--pods", choices=["node", "process"], default="node",
                        help="node: a real node runs the chart's operator and the merge pods (default); "
                             "process: the quick lane, local processes in place of a node")
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    parser.add_argument("--leave-running", action="store_true",
                        help="exit, leaving everything running (stop it with privatefm-cluster down --dir DIR)")
    args = parser.parse_args(argv)
    if args.dir.exists():
        import shutil

        LocalCluster(args.dir).stop()
        shutil.rmtree(args.dir)
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    return run(args.dir.resolve(), args.keep, args.pods, args.leave_running)


if __name__ == "__main__":
    sys.exit(main())
