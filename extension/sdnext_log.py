"""hybrid-vae's voice inside SD.Next: the ``hybrid_vae`` logger forwarded to SD.Next's own logger.

hybrid-vae logs through one named stdlib logger, ``hybrid_vae`` (and its children ``hybrid_vae.sdnext``,
``hybrid_vae.orchestrator``, ...). Outside SD.Next (CLI, ComfyUI, scripts) records propagate to the root
logger as usual. SD.Next sends the root logger to a ``NullHandler`` at level ERROR and logs through its own
logger (``modules.shared.log``: ``logging.getLogger("sd")`` with a console handler at INFO, DEBUG with
``--debug``, a log file at DEBUG and the UI's ring buffer), so a record that propagates to the root is lost.
:func:`attach` (called first thing by ``scripts/hybrid_vae.py``) adds one :class:`ForwardToSDNext` handler to
the ``hybrid_vae`` logger, which hands every record to SD.Next's logger: SD.Next's handlers then apply their own
levels and formats, and the record keeps its name (``hybrid_vae.sdnext``), so the log file says where it came from.

After its startup SD.Next replaces the handlers of every logger whose name does not start with ``sd`` or
``uvicorn`` with its own logger's handler list (``webui.py``, 058a7f0): ``hybrid_vae`` and its children then all
carry SD.Next's handlers, so a record would be written once per logger on its way up. :func:`attach` undoes that
(``hybrid_vae`` gets the forwarder back, its children no handlers of their own); the SD.Next runtime calls it
before each generation, so at most the lines between SD.Next's startup and the first generation can be doubled.

Standard library only: it must work when the engine's dependencies are missing (that error is logged too).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["LOGGER", "ForwardToSDNext", "attach"]

LOGGER = "hybrid_vae"


class ForwardToSDNext(logging.Handler):
    """Hands each record to ``target`` (SD.Next's logger), whose handlers decide by their own levels.

    Args:
        target (`logging.Logger`): SD.Next's logger (``modules.shared.log``).
    """

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(logging.NOTSET)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.target.handle(record)
        except Exception:  # a log line must never break a decode
            self.handleError(record)


def attach(shared: Any = None) -> bool:
    """Forward the ``hybrid_vae`` logger to SD.Next's logger (once; a second call only updates the target).

    Args:
        shared: SD.Next's ``modules.shared`` (default: imported); its ``log`` is the target.

    Returns:
        True when SD.Next's logger was found and the forwarding is in place; False otherwise (the logger
        then keeps stdlib behaviour).
    """
    if shared is None:
        try:
            from modules import shared
        except ImportError:
            return False
    target = getattr(shared, "log", None)
    if not isinstance(target, logging.Logger):
        return False
    ours = logging.getLogger(LOGGER)
    mine = [h for h in ours.handlers if isinstance(h, ForwardToSDNext)]
    if mine and len(mine) == len(ours.handlers):
        mine[0].target = target
        return True
    # first call, or SD.Next replaced our handlers by its own list: a new list (never mutate SD.Next's), and no
    # handlers on the children (they reach SD.Next through the forwarder, once)
    ours.handlers = mine[:1] or [ForwardToSDNext(target)]
    ours.handlers[0].target = target
    for name, obj in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith(LOGGER + ".") and isinstance(obj, logging.Logger) and obj.handlers:
            obj.handlers = [h for h in obj.handlers if h not in target.handlers]
    # SD.Next's handlers filter by level (as for its own records: its logger is at DEBUG so the file gets
    # everything); without this the root's ERROR level would drop INFO and WARNING before they reach them
    ours.setLevel(logging.DEBUG)
    ours.propagate = False  # the root's NullHandler would swallow it anyway; never print it twice
    return True
