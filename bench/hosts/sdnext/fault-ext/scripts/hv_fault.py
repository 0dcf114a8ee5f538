"""Test-only SD.Next extension (bench/hosts/sdnext): makes every VAE decode run out of memory while the file
``<SD.Next data folder>/hv-fault-oom`` exists, so the real host shows what hybrid-vae does when every plan fails;
and, before each generation, writes ``<data>/hv-host-info.json``: where ``hybrid_vae`` was imported from, whether
anything of it is on ``sys.path``, and which top-level modules come from its folder (check.py reads it).

A forward pre-hook on the loaded model's ``vae.decoder`` raises a real ``torch.OutOfMemoryError`` (the GPU plans
and the CPU plan all run that decoder). Installed next to hybrid-vae by check.py; never part of the product.
"""

import json
import os
import sys

from modules import script_callbacks, shared


def _flag() -> str:
    return os.path.join(str(getattr(shared.cmd_opts, "data_dir", None) or "."), "hv-fault-oom")


def _hook(module, args):
    import torch

    if os.path.exists(_flag()):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by hv_fault.py)")


def _arm(p):
    model = shared.sd_model  # a generation is starting: the model is loaded anyway
    vae = getattr(model, "vae", None)
    decoder = getattr(vae, "decoder", None)
    if decoder is not None and not getattr(decoder, "_hv_fault", False):
        decoder.register_forward_pre_hook(_hook)
        decoder._hv_fault = True


def _host_info(p):
    mod = sys.modules.get("hybrid_vae")
    root = os.path.dirname(os.path.abspath(mod.__file__)) if mod is not None and mod.__file__ else None
    ours = sorted(name for name, m in list(sys.modules.items())
                  if root and "." not in name and name != "hybrid_vae"
                  and os.path.abspath(str(getattr(m, "__file__", "") or "")).startswith(root + os.sep))
    info = {"hybrid_vae_file": getattr(mod, "__file__", None), "extension_on_sys_path": bool(root) and any(
        os.path.abspath(x or ".") == root for x in sys.path), "top_level_modules_from_the_extension": ours,
        "server_module": getattr(sys.modules.get("server"), "__file__", None)}
    with open(os.path.join(str(getattr(shared.cmd_opts, "data_dir", None) or "."), "hv-host-info.json"), "w") as f:
        json.dump(info, f)


script_callbacks.on_before_process(_arm)
script_callbacks.on_before_process(_host_info)
