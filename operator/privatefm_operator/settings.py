"""Operator settings, from environment variables (a ConfigMap feeds them through envFrom)."""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from privatefm_operator.schedules import Window
from privatefm_operator.sharding import Shard, ordinal


class Settings(BaseSettings):
    """Every knob the operator has. Names are ``PRIVATEFM_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="PRIVATEFM_", extra="ignore")

    # Store
    s3_endpoint: str = Field(default="", description="S3 endpoint URL; empty uses AWS's default")
    s3_bucket: str = Field(default="privatefm", description="Bucket holding base/ and learners/")
    s3_region: str = Field(default="us-east-1")
    s3_access_key: str = Field(default="", description="The operator's own static key; empty: boto3's default "
                                                       "chain (IRSA, Pod Identity, instance profile)")
    s3_secret_key: str = Field(default="")
    store_credentials: Literal["sts", "shared-insecure"] = Field(
        default="sts", description="sts: every run gets temporary credentials from STS AssumeRole with a session "
                                   "policy scoped to that run. shared-insecure: runs get the operator's own keys "
                                   "(for stores without STS; no isolation between learners in the store)")
    sts_endpoint: str = Field(default="", description="STS endpoint; empty: the S3 endpoint (MinIO, Ceph RGW), "
                                                      "or AWS's regional STS when that is empty too")
    store_role_arn: str = Field(default="arn:aws:iam::000000000000:role/privatefm-merge",
                                description="Role the operator assumes to mint run credentials (AWS, Ceph RGW: "
                                            "a real role; MinIO ignores it)")
    store_role_external_id: str = Field(default="", description="ExternalId the role's trust policy requires")
    store_timeout_seconds: float = Field(default=10.0, gt=0, description="Connect and read timeout of the "
                                                                        "operator's store and STS calls")
    store_grace_seconds: float = Field(default=120.0, ge=0, description="How long an unreachable store leaves "
                                                                       "learners Ready (StoreAvailable=False at once)")
    s3_egress_cidr: str = Field(default="", description="CIDR merge pods may reach S3 at; default the endpoint IP")

    # A private CA for the store (merge and verify pods): a ConfigMap of this name must exist in every
    # learner namespace (e.g. distributed by trust-manager); its key is mounted and AWS_CA_BUNDLE names it.
    ca_bundle_configmap: str = Field(default="", description="ConfigMap with the store's CA bundle, in every "
                                                             "learner namespace; empty: the image's trust store")
    ca_bundle_key: str = Field(default="ca.crt", description="Key of the CA bundle in that ConfigMap")

    # Merge pods
    merge_image: str = Field(default="ghcr.io/privatefm/merge:0.1.0")
    merge_image_pull_policy: str = Field(default="IfNotPresent")
    merge_gpus: int = Field(default=1, ge=0, description="Default GPUs when spec.merge.gpus is unset")
    merge_cpu: str = Field(default="2")
    merge_memory: str = Field(default="16Gi")
    merge_deadline_seconds: int = Field(default=6 * 3600, ge=60)
    merge_run_as_user: int = Field(default=65532)
    merge_pending_timeout_seconds: float = Field(
        default=1800.0, gt=0, description="How long a merge pod may stay Pending (unschedulable, image pull) "
                                          "before its AdapterMerge turns Stalled")
    job_history: int = Field(default=3, ge=0, description="Finished scheduled Jobs each CronJob keeps")
    merge_concurrency: int = Field(
        default=0, ge=0, description="Most merge Jobs running at once in the whole cluster; 0: no limit. Runs "
                                     "beyond it wait, Pending with reason Queued and their position, and start "
                                     "in a fair order (learners with fewer runs going first, then oldest first)")
    kueue_queue_name: str = Field(
        default="", description="With Kueue: the LocalQueue (in each learner namespace) merge Jobs are handed to. "
                                "The operator labels a prepared, suspended Job kueue.x-k8s.io/queue-name and "
                                "leaves admitting (un-suspending) it to Kueue; mergeConcurrency is not used")
    kueue_cluster_queue: str = Field(
        default="", description="With kueueQueueName: the ClusterQueue the operator points each learner's "
                                "LocalQueue at (it then creates that LocalQueue); empty: the platform makes them")
    default_schedule_window: str = Field(
        default="02:00-05:00", description="HH:MM-HH:MM: a learner without spec.merge.schedule merges once a day "
                                           "at its own point of this window (in its time zone); may pass midnight")

    # Learner namespaces
    quota_pods: int = Field(default=4)
    quota_cpu: str = Field(default="16")
    quota_memory: str = Field(default="128Gi")

    # Behaviour
    max_version_lag: int = Field(default=3, ge=0, description="A learner further behind the base falls back")
    fallback_retry_limit: int = Field(default=3, ge=1, description="Fallback merges tried before Stalled")
    fallback_backoff_seconds: float = Field(default=60.0, gt=0, description="Delay after the first failed "
                                                                           "fallback; doubles after each")
    integrity_check_seconds: float = Field(default=3600.0, gt=0, description="Cheap check interval per learner "
                                                                            "(staggered)")
    deep_check_seconds: float = Field(default=7 * 86400.0, gt=0, description="Deep check (verify Job) interval "
                                                                             "per learner (staggered)")
    cleanup_cron: str = Field(default="0 4 * * 0", description="When retention prunes old checkpoints (UTC)")
    stale_upload_seconds: float = Field(default=86400.0, ge=0, description="Retention aborts unfinished multipart "
                                                                       "uploads older than this")
    resync_seconds: float = Field(default=300.0, gt=0, description="How often each learner's due work is looked "
                                                                  "at (integrity-check slots, fallback retries, "
                                                                  "retention); a pass with nothing due makes no "
                                                                  "request. Drift is repaired from watch events")
    full_resync_seconds: float = Field(default=6 * 3600.0, gt=0, description="The safety net: how often each "
                                                                           "learner's children are applied and its "
                                                                           "open runs looked at, whatever the "
                                                                           "watches said (jittered by up to +25%)")
    # Sharding and standbys (sharding, leases)
    shards: int = Field(default=1, ge=1, description="How many shards the learners are split into (by a stable "
                                                     "hash of their learnerId); each is run by one process at a "
                                                     "time")
    shard_index: int = Field(default=-1, ge=-1, description="The shard this process serves; -1: its StatefulSet "
                                                            "ordinal (from the host name) modulo shards")
    lease_namespace: str = Field(default="", description="Where the shards' Leases live (the operator's own "
                                                         "namespace); empty: no Lease, for a single process "
                                                         "outside a cluster")
    lease_duration_seconds: float = Field(default=15.0, gt=0, description="A shard's Lease is free once its "
                                                                         "holder has not renewed it this long")
    lease_renew_deadline_seconds: float = Field(default=10.0, gt=0, description="A holder that could not renew "
                                                                               "for this long exits, before "
                                                                               "anyone may take its shard")
    lease_retry_seconds: float = Field(default=2.0, gt=0, description="How often a Lease is renewed, or tried "
                                                                     "by a standby")
    workers: int = Field(default=16, ge=1, le=256,
                         description="Threads the reconciles run in. A reconcile waits on the API server and the "
                                     "store most of its time, so more threads than cores keep both busy")
    http_port: int = Field(default=8080, description="/metrics, /healthz, /readyz")
    liveness_port: int = Field(default=8081, description="kopf's own liveness endpoint, on 127.0.0.1 only; "
                                                         "/healthz asks it")

    @model_validator(mode="after")
    def _kueue(self) -> Settings:
        if self.kueue_cluster_queue and not self.kueue_queue_name:
            raise ValueError("kueue_cluster_queue needs kueue_queue_name: the LocalQueue it would back")
        return self

    @model_validator(mode="after")
    def _leases(self) -> Settings:
        if not self.lease_retry_seconds < self.lease_renew_deadline_seconds < self.lease_duration_seconds:
            raise ValueError("lease settings need retry < renew deadline < duration")
        if self.shard_index >= self.shards:
            raise ValueError(f"shard_index {self.shard_index} is not below shards ({self.shards})")
        if self.shards > 1 and not self.lease_namespace:
            raise ValueError("more than one shard needs lease_namespace: each shard is held through a Lease")
        return self

    @field_validator("default_schedule_window")
    @classmethod
    def _a_window(cls, value: str) -> str:
        Window.parse(value)  # raises, naming the setting, when the operator starts
        return value

    def shard(self, hostname: str) -> Shard:
        """This process's shard: shard_index, or else the StatefulSet ordinal in ``hostname``."""
        if self.shard_index >= 0:
            return Shard(self.shard_index, self.shards)
        replica = ordinal(hostname)
        if replica is None and self.shards > 1:
            raise ValueError(f"host name {hostname!r} has no StatefulSet ordinal: set shard_index")
        return Shard.of_replica(replica or 0, self.shards)

    @functools.cached_property
    def schedule_window(self) -> Window:
        return Window.parse(self.default_schedule_window)
