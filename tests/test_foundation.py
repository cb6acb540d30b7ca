"""The ground every other test stands on: the real control plane and S3 server behave as such."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from privatefm_testing.cluster import BIN, LocalCluster, pid_alive
from privatefm_testing.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.foundation.privatefm.io"},
    "spec": {
        "group": "foundation.privatefm.io",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "required": ["size"], "properties": {
                    "size": {"type": "integer", "minimum": 1, "maximum": 10}}}}}},
        }],
    },
}


def test_crd_and_custom_resource_round_trip(kube: Kube, namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    kube.wait_established("widgets.foundation.privatefm.io")
    widget = {"apiVersion": "foundation.privatefm.io/v1", "kind": "Widget",
              "metadata": {"name": "w1", "namespace": namespace}, "spec": {"size": 3}}
    kube.kubectl("apply", "-f", "-", input=json.dumps(widget))
    got = json.loads(kube.kubectl("get", "widget", "w1", "-n", namespace, "-o", "json").stdout)
    assert got["spec"] == {"size": 3}
    assert got["metadata"]["uid"]


def test_invalid_custom_resource_is_rejected_by_schema(kube: Kube, namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    kube.wait_established("widgets.foundation.privatefm.io")
    bad = {"apiVersion": "foundation.privatefm.io/v1", "kind": "Widget",
           "metadata": {"name": "w2", "namespace": namespace}, "spec": {"size": 99}}
    proc = kube.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert "spec.size" in proc.stderr and "less than or equal to 10" in proc.stderr


def test_cronjob_makes_controller_manager_create_a_job(kube: Kube, namespace: str) -> None:
    kube.kubectl("create", "cronjob", "tick", "-n", namespace, "--image=busybox", "--schedule=* * * * *",
                 "--", "true")

    def job_names() -> list[str]:
        out = kube.kubectl("get", "jobs", "-n", namespace, "-o", "json").stdout
        return [j["metadata"]["name"] for j in json.loads(out)["items"]
                if j["metadata"].get("ownerReferences", [{}])[0].get("name") == "tick"]

    names = wait_for(job_names, 90, "the CronJob controller to create a Job")
    assert names[0].startswith("tick-")


def test_namespace_with_objects_is_deleted(kube: Kube, uid: str) -> None:
    ns = f"doomed-{uid}"
    kube.kubectl("create", "namespace", ns)
    kube.kubectl("create", "configmap", "data", "-n", ns, "--from-literal=a=b")
    kube.kubectl("create", "serviceaccount", "worker", "-n", ns)
    kube.kubectl("delete", "namespace", ns, "--wait=false")
    wait_for(lambda: kube.kubectl("get", "namespace", ns, check=False).returncode != 0, 90,
             "the namespace controller to empty and remove the namespace")


def test_garbage_collector_removes_dependents(kube: Kube, namespace: str) -> None:
    kube.kubectl("create", "configmap", "owner", "-n", namespace)
    owner_uid = kube.kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    dependent = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "dependent", "namespace": namespace,
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}]}}
    kube.kubectl("apply", "-f", "-", input=json.dumps(dependent))
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(lambda: kube.kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode != 0,
             60, "the garbage collector to delete the dependent")


def test_user_without_rights_gets_403(kube: Kube, namespace: str) -> None:
    proc = kube.kubectl("get", "pods", "-n", namespace, as_user="mallory", check=False)
    assert proc.returncode != 0
    assert "Forbidden" in proc.stderr and "mallory" in proc.stderr
    # The same through the Python client, with a raw 403.
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as err:
        client.CoreV1Api(kube.api_client(as_user="mallory")).list_namespaced_pod(namespace)
    assert err.value.status == 403
    assert kube.kubectl("auth", "can-i", "list", "pods", "-n", namespace, as_user="mallory",
                        check=False).stdout.strip() == "no"


def test_s3_put_get_and_multipart(s3: Any, s3_prefix: str) -> None:
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key=f"{s3_prefix}/small.txt", Body=b"hello")
    assert client.get_object(Bucket=s3.bucket, Key=f"{s3_prefix}/small.txt")["Body"].read() == b"hello"

    key = f"{s3_prefix}/big.bin"
    parts = [bytes([i]) * (5 * 1024 * 1024) for i in range(2)] + [b"tail"]
    upload = client.create_multipart_upload(Bucket=s3.bucket, Key=key)
    etags = [
        {"PartNumber": n, "ETag": client.upload_part(Bucket=s3.bucket, Key=key, PartNumber=n,
                                                      UploadId=upload["UploadId"], Body=body)["ETag"]}
        for n, body in enumerate(parts, start=1)
    ]
    client.complete_multipart_upload(Bucket=s3.bucket, Key=key, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": etags})
    got = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert got == b"".join(parts)
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=s3_prefix)["Contents"]
    assert sorted(o["Key"] for o in listed) == [key, f"{s3_prefix}/small.txt"]


def test_built_kubectl_and_helm_answer_from_the_local_api_server(kube: Kube) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.33.")
    assert version["clientVersion"]["gitVersion"] == version["serverVersion"]["gitVersion"]
    helm = subprocess.run([str(BIN / "helm"), "version", "--short"], env=kube.env(), capture_output=True,
                          text=True, check=True)
    assert helm.stdout.startswith("v3.")
    listed = subprocess.run([str(BIN / "helm"), "list", "-A", "-o", "json"], env=kube.env(),
                            capture_output=True, text=True, check=True)
    assert isinstance(json.loads(listed.stdout), list)


def test_cluster_stop_leaves_no_process(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c")
    cluster.start()
    pids = cluster.pids
    assert len(pids) == 4 and all(pid_alive(p) for p in pids)
    cluster.stop()
    assert [p for p in pids if pid_alive(p)] == []
    # No orphaned child of any component either (etcd/apiserver never fork, but check the tree).
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in out
