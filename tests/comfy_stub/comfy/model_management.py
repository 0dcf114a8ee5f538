"""Stand-in for ``comfy.model_management`` (tests only). ``LOAD_CALLS`` records ``load_models_gpu`` calls."""

import contextlib

import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError
LOAD_CALLS: list = []


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    LOAD_CALLS.append({"models": list(models), "memory_required": memory_required, "force_full_load": force_full_load})


def get_free_memory(dev=None, torch_free_too=False):
    return 64 * 1024**3


def soft_empty_cache(force=False):
    return None


def intermediate_device():
    return torch.device("cpu")


def vae_device():
    return torch.device("cpu")


def vae_offload_device():
    return torch.device("cpu")


def vae_dtype(device=None, allowed_dtypes=()):
    return torch.float32


def dtype_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def cuda_device_context(device):
    return contextlib.nullcontext()


def raise_non_oom(e):
    if not isinstance(e, OOM_EXCEPTION):
        raise e
