"""SD.Next's ``modules.script_callbacks``: ``on_*`` registration, the ``*_callback`` firing functions, ``clear_callbacks``.

Each registration records the file that called ``on_*`` (as SD.Next does); a failing callback is
reported and the others still run.
"""

import sys
from collections import namedtuple

from modules import errors

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback"])
callback_map = {
    "callbacks_app_started": [],
    "callbacks_before_process": [],
    "callbacks_after_process": [],
    "callbacks_model_loaded": [],
    "callbacks_ui_settings": [],
    "callbacks_script_unloaded": [],
    "callbacks_on_reload": [],
}


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def add_callback(callbacks, fun):
    filename = sys._getframe().f_back.f_back.f_code.co_filename
    callbacks.append(ScriptCallback(filename, fun))


def _fire(name, *args, reverse=False):
    items = callback_map[name]
    for c in (reversed(items) if reverse else list(items)):
        try:
            c.callback(*args)
        except Exception as e:
            errors.display(e, f"Executing callback: {c.script} {name}")


def on_before_process(callback):
    add_callback(callback_map["callbacks_before_process"], callback)


def on_after_process(callback):
    add_callback(callback_map["callbacks_after_process"], callback)


def on_model_loaded(callback):
    add_callback(callback_map["callbacks_model_loaded"], callback)


def on_ui_settings(callback):
    add_callback(callback_map["callbacks_ui_settings"], callback)


def on_script_unloaded(callback):
    add_callback(callback_map["callbacks_script_unloaded"], callback)


def on_before_reload(callback):
    add_callback(callback_map["callbacks_on_reload"], callback)


def before_process_callback(p):
    _fire("callbacks_before_process", p)


def after_process_callback(p):
    _fire("callbacks_after_process", p)


def model_loaded_callback(sd_model):
    _fire("callbacks_model_loaded", sd_model)


def ui_settings_callback():
    _fire("callbacks_ui_settings")


def script_unloaded_callback():
    _fire("callbacks_script_unloaded", reverse=True)


def app_reload_callback():
    _fire("callbacks_on_reload")
