"""``privatefm-merge``: merge, verify, and the merge pod's entry point.

    privatefm-merge [merge] --base <dir|s3://…> --adapter <dir|s3://…> [--adapter …] --output <dir|s3://…>
                    [--device …]   # --adapter again for each adapter of the log, in fold order
    privatefm-merge verify <dir|s3://…> [--sizes-only] [--json] [--result-path PATH]
                    # --result-path: a VerifyResult JSON there (a verify Job's termination message)
    privatefm-merge seal <dir|s3://…> [--version K]   # write manifest.json for e.g. an uploaded base
    privatefm-merge pod     # job from PRIVATEFM_* variables, result JSON to PRIVATEFM_RESULT_PATH

Exit status: 0 success, 1 failure (merge failed, verification failed), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privatefm_merge.contract import (
    DEVICES,
    PROBLEM_REASONS,
    MergeJob,
    MergeResult,
    Reason,
    VerifyReason,
    VerifyResult,
    part_size_from_env,
    result_path_from_env,
)
from privatefm_merge.errors import MergeError, StorageError
from privatefm_merge.jsonlog import JsonFormatter
from privatefm_merge.layout import MANIFEST_NAME
from privatefm_merge.store import DEFAULT_PART_SIZE

if TYPE_CHECKING:
    from privatefm_merge.verify import VerifyReport

log = logging.getLogger("privatefm_merge")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{record.getMessage()} {extra}".rstrip()


def _setup_logging(json_lines: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else _TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _event(event: str, fields: dict[str, Any]) -> None:
    log.info(event, extra={"fields": fields})


def run_merge(job: MergeJob, *, part_size: int | None = None) -> MergeResult:
    """Run the operator's merge job and describe the outcome as a ``MergeResult`` (never raises)."""
    return merge_to_result(job.base_uri, [a.uri for a in job.adapters], job.output_uri, device=job.device,
                           version=job.target_version, parent_version=job.parent_version,
                           base_model=job.base_model, base_version=job.base_version, part_size=part_size,
                           adapter_seqs=[a.seq for a in job.adapters])


def merge_to_result(base_uri: str, adapter_uris: Sequence[str], output_uri: str, *, device: str = "auto",
                    version: int | None = None, parent_version: int | None = None,
                    base_model: str | None = None, base_version: int | None = None,
                    part_size: int | None = None, adapter_seqs: Sequence[int] | None = None) -> MergeResult:
    """Fold the adapters (in order) and report; every failure becomes a ``Failed`` result with a
    reason. ``adapter_seqs``: their sequence numbers in the learner's log (default: see
    ``adapter_log.default_seqs``)."""
    started = time.perf_counter()
    adapter_uris = [adapter_uris] if isinstance(adapter_uris, str) else list(adapter_uris)

    def failed(reason: Reason, message: str) -> MergeResult:
        return MergeResult(status="Failed", version=version, output_uri=output_uri, reason=reason.value,
                           message=message, duration_seconds=round(time.perf_counter() - started, 3))

    try:
        from privatefm_merge.engine import MergeOptions, merge_checkpoint  # torch is imported here

        options = MergeOptions(device=device, version=version, parent_version=parent_version,
                               base_model=base_model, base_version=base_version, progress=_event,
                               adapter_seqs=adapter_seqs, part_size=part_size or DEFAULT_PART_SIZE)
        _event("merge_started", {"base": base_uri, "adapters": adapter_uris, "output": output_uri,
                                 "version": version, "device": device})
        summary = merge_checkpoint(base_uri, adapter_uris, output_uri, options)
    except MergeError as err:
        log.error("merge_failed", extra={"fields": {"reason": err.reason.value, "message": err.message}})
        return failed(err.reason, err.message)
    except Exception as err:  # a bug or an unexpected library failure: still report it
        reason = Reason.STORAGE_ERROR if _looks_like_storage(err) else Reason.INTERNAL_ERROR
        log.exception("merge_failed", extra={"fields": {"reason": reason.value}})
        return failed(reason, f"{type(err).__name__}: {err}")
    duration = round(time.perf_counter() - started, 3)
    _event("merge_succeeded", {"output": summary.output_uri, "manifest_sha256": summary.manifest_sha256,
                               "bytes": summary.total_bytes, "files": summary.file_count,
                               "already_committed": summary.already_committed,
                               **{k: round(v, 3) for k, v in summary.timings.items()}})
    return MergeResult(status="Succeeded", version=version, output_uri=summary.output_uri,
                       manifest_sha256=summary.manifest_sha256, total_bytes=summary.total_bytes,
                       file_count=summary.file_count, duration_seconds=duration,
                       adapter_seqs=summary.manifest.adapter_seqs,
                       message="already committed by an earlier identical run" if summary.already_committed
                       else f"merged {summary.file_count} files")


def _looks_like_storage(err: BaseException) -> bool:
    module = type(err).__module__
    return isinstance(err, StorageError | OSError) or module.startswith(("botocore", "boto3", "urllib3"))


def _write_result(path: str, result: MergeResult) -> None:
    try:
        Path(path).write_text(result.to_json())
    except OSError as err:
        log.error("result_not_written", extra={"fields": {"path": path, "error": str(err)}})


def cmd_pod(env: Mapping[str, str]) -> int:
    _setup_logging(json_lines=True)
    result_path = result_path_from_env(env)
    try:
        job = MergeJob.from_env(env)
        part_size = part_size_from_env(env)
    except ValueError as err:
        result = MergeResult(status="Failed", reason=Reason.CONFIG_INVALID.value, message=str(err))
        log.error("merge_failed", extra={"fields": {"reason": result.reason, "message": result.message}})
        _write_result(result_path, result)
        return 1
    # Who the pod really runs as (the Job asks for 65532; a cluster's policy may differ).
    _event("pod_started", {"uid": os.getuid(), "gid": os.getgid(), "version": job.target_version})
    result = run_merge(job, part_size=part_size)
    _write_result(result_path, result)
    return 0 if result.succeeded else 1


def cmd_merge(args: argparse.Namespace) -> int:
    _setup_logging(json_lines=args.json_logs)
    result = merge_to_result(args.base, args.adapter, args.output, device=args.device, version=args.version,
                             parent_version=args.parent_version, base_model=args.base_model,
                             base_version=args.base_version)
    print(result.model_dump_json(by_alias=True, indent=2))
    return 0 if result.succeeded else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from privatefm_merge.verify import verify_checkpoint

    try:
        report = verify_checkpoint(args.uri, hash_files=not args.sizes_only)
    except StorageError as err:
        print(f"error: {err.message}", file=sys.stderr)
        if args.result_path:
            _write_verify_result(args.result_path, VerifyResult(
                status="Failed", uri=args.uri, reason=VerifyReason.STORAGE_ERROR.value, message=err.message))
        return 1
    if args.json:
        print(json.dumps({"uri": report.uri, "exists": report.exists, "ok": report.ok,
                          "message": report.message,
                          "manifestSha256": report.manifest_sha256, "totalBytes": report.total_bytes,
                          "fileCount": report.file_count,
                          "problems": [{"name": p.name, "reason": p.reason, "detail": p.detail}
                                       for p in report.problems]}, indent=2))
    elif report.ok:
        print(f"OK {report.uri}: {report.message}; manifest sha256 {report.manifest_sha256}")
    else:
        print(f"FAILED {report.uri}: {report.message}", file=sys.stderr)
    if args.result_path:
        _write_verify_result(args.result_path, verify_result(report))
    return 0 if report.ok else 1


def verify_result(report: VerifyReport) -> VerifyResult:
    """A ``VerifyReport`` as the verify Job's termination message: the first bad file (by name) and
    its reason."""
    common = {"uri": report.uri, "manifest_sha256": report.manifest_sha256, "message": report.message,
              "file_count": report.file_count if report.manifest else None,
              "total_bytes": report.total_bytes if report.manifest else None}
    if report.ok:
        return VerifyResult(status="Passed", **common)
    if not report.exists:
        return VerifyResult(status="Failed", reason=VerifyReason.MANIFEST_MISSING.value, file=MANIFEST_NAME,
                            **common)
    first = report.problems[0]
    return VerifyResult(status="Failed", reason=PROBLEM_REASONS[first.reason].value, file=first.name,
                        bad_files=len(report.problems), **common)


def _write_verify_result(path: str, result: VerifyResult) -> None:
    try:
        Path(path).write_text(result.to_json())
    except OSError as err:
        print(f"error: could not write the result to {path}: {err}", file=sys.stderr)


def cmd_seal(args: argparse.Namespace) -> int:
    from privatefm_merge.seal import seal_checkpoint

    try:
        manifest, digest = seal_checkpoint(args.uri, version=args.version)
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"sealed {args.uri}: {len(manifest.files)} files, {manifest.total_bytes} bytes; "
          f"manifest sha256 {digest}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privatefm-merge", description="Streaming LoRA merge into a "
                                     "versioned, hash-verified checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge an adapter into a base checkpoint (the default command)")
    merge.add_argument("--base", required=True, help="base checkpoint: a directory or s3://bucket/prefix")
    merge.add_argument("--adapter", required=True, action="append",
                       help="PEFT adapter: a directory or s3://bucket/prefix; repeat for each adapter to "
                            "fold, in order (the first may be cumulative, the rest must be incremental)")
    merge.add_argument("--output", required=True, help="new checkpoint: a directory or s3://bucket/prefix")
    merge.add_argument("--device", choices=DEVICES, default="auto")
    merge.add_argument("--version", type=int, default=None, help="version recorded in the manifest")
    merge.add_argument("--parent-version", type=int, default=None)
    merge.add_argument("--base-model", default=None, help="base model name recorded in the manifest")
    merge.add_argument("--base-version", type=int, default=None)
    merge.add_argument("--json-logs", action="store_true", help="log JSON lines to stderr")
    verify = sub.add_parser("verify", help="rehash a checkpoint against its manifest")
    verify.add_argument("uri")
    verify.add_argument("--sizes-only", action="store_true", help="check existence and sizes, do not hash")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument("--result-path", default=None, help="also write a compact VerifyResult JSON "
                        "(< 4096 bytes) here, e.g. /dev/termination-log in a verify Job")
    seal = sub.add_parser("seal", help="write manifest.json for a checkpoint that has none "
                                       "(e.g. an uploaded base)")
    seal.add_argument("uri")
    seal.add_argument("--version", type=int, default=None, help="version recorded in the manifest")
    sub.add_parser("pod", help="merge-pod mode: job from PRIVATEFM_* variables, "
                               "result to PRIVATEFM_RESULT_PATH")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0].startswith("--") and args_list[0] not in ("--help", "-h"):
        args_list.insert(0, "merge")  # `privatefm-merge --base …` is `privatefm-merge merge --base …`
    args = _parser().parse_args(args_list)
    if args.command == "pod":
        return cmd_pod(os.environ)
    if args.command == "verify":
        return cmd_verify(args)
    if args.command == "seal":
        return cmd_seal(args)
    return cmd_merge(args)


if __name__ == "__main__":
    sys.exit(main())
