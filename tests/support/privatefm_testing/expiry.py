"""A pytest plugin for the one store test that has to outlive its credentials.

STS will not mint a session shorter than 900 s (AWS's minimum, and MinIO's, with no setting to
lower it), so "a run's credentials stop working when they expire" takes 15 minutes to show.
Rather than adding those 15 minutes to the suite, this plugin mints the session as early as it
can and the test checks it as late as it can:

- after collection (``pytest_collection_finish``), when a selected test requests the
  ``expiring_merge_session`` fixture, the plugin starts its own MinIO (in a temporary
  directory), makes the operator user, stores one small object, and mints a 900 s merge session
  through the operator's own code (``Storage.mint_run_credentials``), reading the object with it
  at once;
- every test that requests the fixture runs last in the session (``pytest_collection_modifyitems``),
  so it only sleeps for whatever is left of the 900 s once the rest of the suite has run; alone,
  it waits the whole 15 minutes;
- the server stops, and its directory goes, at ``pytest_sessionfinish``.

The test module registers the plugin with ``pytest_plugins``; it takes part only when a test
that needs it is selected.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from privatefm_merge import layout
from privatefm_operator import store_policy
from privatefm_operator.settings import Settings
from privatefm_operator.storage import Storage

from privatefm_testing.cluster import Credentials, pid_alive
from privatefm_testing.minio import MinioServer

FIXTURE = "expiring_merge_session"
DURATION_SECONDS = store_policy.STS_MIN_DURATION_SECONDS  # 900: the shortest session STS mints
BUCKET = "privatefm"
MODEL = "tiny-llama"
NS_UID = "0c9b8a7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d"
BASE_VERSION = 1
TARGET_VERSION = 2


@dataclass
class ExpiringMergeSession:
    """A merge run's session, minted before the first test ran."""

    endpoint: str
    credentials: Credentials
    key: str                # an object the session may read (in its base version)
    asked_seconds: int      # the DurationSeconds sent to STS
    minted_at: datetime     # taken just before the AssumeRole call (UTC)
    expires_at: datetime    # the Expiration STS answered
    first_read: str         # "allowed", or the error code of the read right after minting
    waited_seconds: float | None = field(default=None)  # set by the test: its sleep for the expiry
    code_after_expiry: str | None = field(default=None)  # set by the test

    def read(self) -> str:
        """Reads ``key`` with the session: "allowed" or the S3 error code."""
        try:
            self.credentials.client().get_object(Bucket=BUCKET, Key=self.key)["Body"].read()
        except ClientError as err:
            return str(err.response.get("Error", {}).get("Code"))
        return "allowed"

    def seconds_left(self) -> float:
        return (self.expires_at - datetime.now(UTC)).total_seconds()

    def wait_past_expiry(self, margin_seconds: float) -> float:
        """Sleeps until ``margin_seconds`` after the expiry; returns (and records) the seconds slept."""
        start = time.monotonic()
        while (left := self.seconds_left() + margin_seconds) > 0:
            time.sleep(min(left, 30.0))
        self.waited_seconds = time.monotonic() - start
        return self.waited_seconds


@dataclass
class _State:
    directory: Path | None = None
    server: MinioServer | None = None
    session: ExpiringMergeSession | None = None
    error: BaseException | None = None


_STATE = pytest.StashKey[_State]()


def _wanted(items: list[pytest.Item]) -> list[pytest.Item]:
    return [item for item in items if FIXTURE in getattr(item, "fixturenames", ())]


@pytest.hookimpl(trylast=True)  # after deselection (-k, -m) and any other reordering
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    late = _wanted(items)
    if late:
        items[:] = [item for item in items if item not in late] + late


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or not _wanted(session.items):
        return
    state = session.config.stash[_STATE] = _State()
    try:
        state.directory = Path(tempfile.mkdtemp(prefix="privatefm-expiry-"))
        state.server = MinioServer(state.directory, bucket=BUCKET)
        state.session = _mint(state.server)
    except Exception as err:  # the test reports it; the rest of the suite runs
        state.error = err
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"expiry: minted a {DURATION_SECONDS} s merge session (expires "
                            f"{state.session.expires_at:%H:%M:%S} UTC); the test that checks it runs last")


def _mint(server: MinioServer) -> ExpiringMergeSession:
    root = server.start()
    operator = server.add_user("privatefm-operator", store_policy.operator_policy(BUCKET))
    base = layout.base_prefix(MODEL, BASE_VERSION)
    key = f"{base}/config.json"
    root.client().put_object(Bucket=BUCKET, Key=key, Body=b'{"model_type": "llama"}')
    storage = Storage(Settings(s3_endpoint=server.endpoint, s3_bucket=BUCKET, s3_region=operator.region,
                               s3_access_key=operator.access_key, s3_secret_key=operator.secret_key,
                               store_credentials="sts"))
    policy = store_policy.merge_session_policy(BUCKET, base, f"{layout.learner_prefix(NS_UID)}/adapters",
                                               layout.checkpoint_prefix(NS_UID, TARGET_VERSION))
    minted_at = datetime.now(UTC)
    issued = storage.mint_run_credentials(policy, DURATION_SECONDS, session_name=f"{NS_UID}-v{TARGET_VERSION}")
    if issued.session_token is None or issued.expires_at is None:
        raise AssertionError(f"STS minted no temporary session: {issued!r}")
    credentials = Credentials(server.endpoint, issued.access_key, issued.secret_key, issued.session_token)
    session = ExpiringMergeSession(server.endpoint, credentials, key, DURATION_SECONDS, minted_at,
                                   issued.expires_at, first_read="")
    session.first_read = session.read()
    return session


@pytest.fixture
def expiring_merge_session(request: pytest.FixtureRequest) -> ExpiringMergeSession:
    """The session minted after collection; its test runs last in the session."""
    state = request.config.stash.get(_STATE, None)
    if state is None:
        raise RuntimeError(f"{FIXTURE}: nothing was minted (requested outside a selected test?)")
    if state.error is not None:
        raise RuntimeError(f"{FIXTURE}: minting before the suite failed: {state.error!r}") from state.error
    assert state.session is not None
    return state.session


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    session = state.session if state else None
    if session is None or session.waited_seconds is None:
        return
    terminalreporter.write_line(
        f"expiry: the {session.asked_seconds} s merge session (minted {session.minted_at:%H:%M:%S}, expired "
        f"{session.expires_at:%H:%M:%S} UTC) was checked after a wait of {session.waited_seconds:.0f} s; "
        f"MinIO answered {session.code_after_expiry}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None:
        return
    try:
        if state.server is not None:
            pid = state.server.pid
            state.server.stop()
            if pid is not None and pid_alive(pid):
                raise RuntimeError(f"expiry: minio (pid {pid}) is still running")
    finally:
        if state.directory is not None:
            shutil.rmtree(state.directory, ignore_errors=True)
