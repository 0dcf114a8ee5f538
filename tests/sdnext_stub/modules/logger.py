"""SD.Next's ``modules.logger`` (058a7f0): ``log = logging.getLogger("sd")`` and what ``setup_logging`` does.

As in SD.Next: the root logger goes to a ``NullHandler`` at level ERROR (so a library's records that propagate
to the root are lost), and SD.Next's own logger is at DEBUG with a console handler (INFO; DEBUG with
``--debug``), a log file handler at DEBUG (``<data>/sdnext.log`` here; SD.Next's is in its root folder) and a
ring buffer at the console level that the UI's log monitor reads (``log.buffer``). Written for the tests.
"""

import logging
import os
import sys

from modules import paths

log = logging.getLogger("sd")
log_file = os.path.join(paths.data_path, "sdnext.log")


class RingBuffer(logging.Handler):
    """The last ``capacity`` formatted records (SD.Next shows them in the UI)."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity
        self.buffer = []

    def emit(self, record):
        self.buffer.append(self.format(record))
        del self.buffer[:-self.capacity]


def setup_logging(debug=False):
    root = logging.getLogger()
    root.setLevel(logging.ERROR)
    root.addHandler(logging.NullHandler())
    level = logging.DEBUG if debug else logging.INFO
    log.setLevel(logging.DEBUG)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    fh = logging.FileHandler(log_file, encoding="utf-8", delay=True)
    fh.setLevel(logging.DEBUG)
    fh.setFormatter(logging.Formatter("%(asctime)s | stub | %(name)s | %(levelname)s | %(module)s | %(message)s"))
    rb = RingBuffer(100)
    rb.setLevel(level)
    rb.setFormatter(logging.Formatter("%(name)s | %(levelname)s | %(message)s"))
    for h in (console, fh, rb):
        log.addHandler(h)
    log.buffer = rb.buffer


setup_logging()


def override_all_loggers():
    """What SD.Next's ``webui.py`` does once its startup is done: every logger whose name does not start with
    ``uvicorn`` or ``sd`` gets SD.Next's handler list (the same list object)."""
    for item in [logging.getLogger(name) for name in logging.root.manager.loggerDict]:
        if item.name.startswith("uvicorn") or item.name.startswith("sd"):
            continue
        item.handlers = log.handlers
