"""SD.Next's device globals: ``device`` (the torch device generation runs on), ``dtype_vae``, ``torch_gc``."""

import contextlib
import gc

import torch

device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
cpu = torch.device("cpu")
dtype_vae = torch.float32


def torch_gc(force=False, fast=False, reason=None):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def inference_context():
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()
