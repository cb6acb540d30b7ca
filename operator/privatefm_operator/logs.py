"""Structured JSON logs (the formatter the merge CLI uses too), with quiet client libraries."""

from __future__ import annotations

import logging

from privatefm_merge.jsonlog import JsonFormatter

HELD = "deletion is held"  # the message the deletion handler retries with (handlers.learner_deleting)


class HeldDeletionIsNoError(logging.Filter):
    """kopf logs each retry of a handler that raised TemporaryError as an error, and posts it as a
    Warning Event. A deletion waiting for its guardian and its delay is the design working, so that
    one is logged at INFO (and so never posted); every other failure stays as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO and HELD in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class QuietRoutine(logging.Filter):
    """kopf logs every handler's success. One of ours runs for every event of every learner: the
    LearnerNamespace watch's hand-over to the timer (``resyncs``), which does nothing worth a line,
    so kopf's success lines for it are dropped; failures stay."""

    ROUTINE = ("Handler 'learner_seen'",)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.levelno <= logging.INFO and message.startswith(self.ROUTINE)
                    and message.endswith("succeeded."))


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kopf.objects").addFilter(HeldDeletionIsNoError())
    logging.getLogger("kopf.objects").addFilter(QuietRoutine())
    for noisy in ("urllib3", "botocore", "boto3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
