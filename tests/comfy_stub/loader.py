"""ComfyUI's way of loading a custom-node folder (``nodes.load_custom_node``), for tests."""

import importlib.util
import os
import sys


def load_custom_node(module_path):
    """Import the folder ``module_path`` as ComfyUI does: module name = the path with dots replaced, registered
    in ``sys.modules`` before it runs (so its relative imports resolve); return the module."""
    sys_module_name = module_path.replace(".", "_x_")
    module_spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[sys_module_name] = module
    module_spec.loader.exec_module(module)
    return module
