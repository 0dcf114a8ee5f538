"""SD.Next's error display: logs the exception with its traceback."""

import logging

log = logging.getLogger("sd")


def display(e, task, suppress=None):
    log.error("%s: %s: %s", task, type(e).__name__, e, exc_info=(type(e), e, e.__traceback__))
