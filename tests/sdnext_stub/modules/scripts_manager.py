"""SD.Next's ``modules.scripts_manager``: ``Script``, ``AlwaysVisible``, ``load_scripts`` and a small runner.

``load_scripts(extension_dirs)`` does what SD.Next's does for each extension's ``scripts/*.py`` (top
level only, sorted): clears the callbacks, puts the extension folder first on ``sys.path`` only while
the file executes, executes it as a module that is NOT put in ``sys.modules``, registers every
``Script`` subclass found in it, and reports (never raises) a file that fails.
"""

import importlib.util
import os
import sys

from modules import errors, script_callbacks

AlwaysVisible = object()


class Script:
    parent = None
    name = None
    filename = None
    args_from = 0
    args_to = 0
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass


scripts_data = []  # (script_class, path, basedir, module)
loaded_modules = []


def load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        errors.display(e, f"Module load: {path}")
    return module


def load_scripts(extension_dirs):
    scripts_data.clear()
    loaded_modules.clear()
    script_callbacks.clear_callbacks()
    syspath = sys.path
    for basedir in extension_dirs:
        folder = os.path.join(basedir, "scripts")
        if not os.path.isdir(folder):
            continue
        for filename in sorted(os.listdir(folder)):
            path = os.path.join(folder, filename)
            if not filename.endswith(".py") or not os.path.isfile(path):
                continue
            try:
                sys.path = [basedir, *sys.path]
                module = load_module(path)
                loaded_modules.append(module)
                for obj in list(module.__dict__.values()):
                    if type(obj) is type and issubclass(obj, Script) and obj is not Script:
                        scripts_data.append((obj, path, basedir, module))
            except Exception as e:
                errors.display(e, f"Load script: {filename}")
            finally:
                sys.path = syspath
    return scripts_data


class ScriptRunner:
    """The always-visible scripts of one tab, their ``ui()`` components and default arguments."""

    def __init__(self, is_img2img=False):
        self.alwayson_scripts = []
        self.script_args = []
        for cls, path, _basedir, _module in scripts_data:
            script = cls()
            script.filename = path
            if script.show(is_img2img) is not AlwaysVisible:
                continue
            script.alwayson = True
            components = script.ui(is_img2img) or []
            script.args_from = len(self.script_args)
            self.script_args.extend(getattr(c, "value", None) for c in components)
            script.args_to = len(self.script_args)
            self.alwayson_scripts.append(script)

    def _each(self, name, p, *extra):
        for script in self.alwayson_scripts:
            args = p.script_args[script.args_from:script.args_to]
            try:
                getattr(script, name)(p, *extra, *args)
            except Exception as e:
                errors.display(e, f"Running script {name}: {script.filename}")

    def process(self, p):
        self._each("process", p)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
