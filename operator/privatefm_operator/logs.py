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
    """kopf logs every handler's success. Two of ours run for every learner all the time: the
    children's watch sees every change of every learner's six objects (a rollout of 10,000 learners:
    60,000 lines saying nothing), and the resync timer ticks for each learner. Their handlers log
    what they do themselves (a drift repair, a check, a fallback), so kopf's success lines for
    them are dropped; failures stay."""

    ROUTINE = ("Handler 'children-", "Timer 'learner_resync'")

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
