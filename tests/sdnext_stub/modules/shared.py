"""SD.Next's ``modules.shared``: ``opts``, ``OptionInfo``, ``state``, ``cmd_opts``, ``data_path``, ``sd_model``, ``log``.

``log`` is SD.Next's logger (:mod:`modules.logger`). ``sd_model`` is a property of the module, as in SD.Next
(``modules/modeldata.py``'s ``Shared``): reading it while no model is loaded logs "Model requested" and would
load the default model; the stand-in records each such read in ``model_requests`` instead of loading.

Options behave like SD.Next's ``modules/options_handler.py``: ``add_option`` only registers the label
(values stay in ``data``, defaults come from the label), attribute reads look in ``secrets``, then
``data``, then the default; writes of keys ending in ``_token``/``_key``/``_secret``/``_password`` go to
``secrets`` (saved to secrets.json), everything else to ``data`` (saved to config.json, non-defaults only).
"""

import argparse
import json
import os
import sys
from types import ModuleType

from modules import paths
from modules.logger import log

SECRETS_PATTERN = ("_version", "_token", "_key", "_secret", "_password")


class OptionInfo:
    """One setting: default, label, gradio component class, its arguments, section ``(id, title)``."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, folder=False, submit=None, comment_before="", comment_after="", category_id=None,
                 *args, **kwargs):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.refresh = refresh
        self.comment_before = comment_before
        self.comment_after = comment_after
        args = {} if callable(component_args) else (component_args or {})
        self.visible = args.get("visible", True) and len(self.label) > 2

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self


class Options:
    def __init__(self, templates=None, *, filename="", secrets=""):
        templates = dict(templates or {})
        object.__setattr__(self, "data_labels", templates)
        object.__setattr__(self, "data", {k: v.default for k, v in templates.items()})
        object.__setattr__(self, "secrets", {})
        object.__setattr__(self, "filename", filename or os.path.join(paths.data_path, "config.json"))
        object.__setattr__(self, "secretsfn", secrets or os.path.join(paths.data_path, "secrets.json"))

    def __getattr__(self, item):
        secrets = object.__getattribute__(self, "secrets")
        data = object.__getattribute__(self, "data")
        labels = object.__getattribute__(self, "data_labels")
        if item in secrets:
            return secrets[item]
        if item in data:
            return data[item]
        if item in labels:
            return labels[item].default
        return object.__getattribute__(self, item)

    def __setattr__(self, key, value):
        if key in self.data_labels or key in self.data or key in self.secrets:
            if any(key.endswith(p) for p in SECRETS_PATTERN):
                self.secrets[key] = value
            else:
                self.data[key] = value
            return
        object.__setattr__(self, key, value)

    def set(self, key, value):
        if key not in self.data_labels and key not in self.data and key not in self.secrets:
            log.warning("Settings: key=%s value=%s unknown", key, value)
            return False
        setattr(self, key, value)
        return True

    def add_option(self, key, info):
        self.data_labels[key] = info

    def save(self):
        everything = {**self.data, **self.secrets}
        diff = {k: v for k, v in everything.items() if k not in self.data_labels or self.data_labels[k].default != v}
        options = {k: v for k, v in diff.items() if not any(k.endswith(p) for p in SECRETS_PATTERN)}
        secrets = {k: v for k, v in diff.items() if k not in options}
        for fn, content in ((self.filename, options), (self.secretsfn, secrets)):
            with open(fn, "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)


class State:
    """Job state: ``interrupted``/``skipped`` (checked by the decode), ``textinfo`` (the UI's status line)."""

    def __init__(self):
        self.interrupted = False
        self.skipped = False
        self.textinfo = None
        self.job = ""
        self.id = 0
        self.jobs = []

    def begin(self, title="", task_id=0, api=None):
        self.interrupted = self.interrupted if title.startswith("Save") else False
        self.skipped = False
        self.textinfo = None
        self.job = title
        self.id += 1
        self.jobs.append(title)
        return self.id

    def end(self, task_id=None, api=None):
        self.job = ""

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True


cmd_opts = argparse.Namespace(profile=False, lowvram=False, medvram=False, experimental=False, freeze=False,
                              data_dir=paths.data_path)
data_path = paths.data_path
opts = Options({
    "sd_vae": OptionInfo("Automatic", "VAE model"),
    "no_half_vae": OptionInfo(False, "Full precision (--no-half-vae)"),
})
state = State()
sd_refiner = None
model_requests = []  # one entry per read of shared.sd_model while no model was loaded
_model = [None]


class Shared(ModuleType):
    @property
    def sd_loaded(self):
        return _model[0] is not None

    @property
    def sd_model(self):
        if _model[0] is None:
            caller = sys._getframe(1).f_code
            model_requests.append(f"{os.path.basename(caller.co_filename)}:{caller.co_name}")
            log.debug("Model requested: fn=%s", model_requests[-1])
        return _model[0]

    @sd_model.setter
    def sd_model(self, value):
        _model[0] = value


sys.modules[__name__].__class__ = Shared
