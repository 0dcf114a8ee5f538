"""GPU probe fallbacks, with NVML replaced at its API boundary (the `pynvml` module) and torch.cuda's
device queries patched (no GPU here)."""

from __future__ import annotations

import sys
import types
import uuid as uuidlib

import pytest
import torch
from hybrid_vae.policy import gpu as gpumod
from hybrid_vae.policy.gpu import GiB, parse_simulation, probe

U0 = uuidlib.UUID("11111111-2222-3333-4444-555555555555")
U1 = uuidlib.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")


def fake_nvml(devices, *, init_error=None):
    """A pynvml module with ``devices`` = [(uuid str, name, total, free)] in NVML (PCI) order."""
    m = types.ModuleType("pynvml")
    calls = {"init": 0, "shutdown": 0}

    def nvmlInit():
        calls["init"] += 1
        if init_error:
            raise init_error

    m.nvmlInit = nvmlInit
    m.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUUID = lambda h: devices[h][0]
    m.nvmlDeviceGetName = lambda h: devices[h][1]
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=devices[h][2], free=devices[h][3],
                                                                 used=devices[h][2] - devices[h][3])
    m.calls = calls
    return m


@pytest.fixture
def cuda_visible(monkeypatch):
    """Pretend torch sees CUDA devices in CUDA_VISIBLE_DEVICES order: [(uuid, name, free, total)]."""

    def install(devs, reserved=0, active=0, split=0):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i: types.SimpleNamespace(name=devs[i][1], uuid=devs[i][0], total_memory=devs[i][3]))
        monkeypatch.setattr(torch.cuda, "memory_stats", lambda i=None: {
            "reserved_bytes.all.current": reserved, "active_bytes.all.current": active,
            "inactive_split_bytes.all.current": split})
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (devs[i or 0][2], devs[i or 0][3]))

    monkeypatch.delenv(gpumod.ENV_SIMULATE, raising=False)
    return install


def test_nvml_matched_by_uuid_under_reordering(cuda_visible, monkeypatch):
    # NVML order: GPU-U0 (3070), GPU-U1 (4090). CUDA_VISIBLE_DEVICES=1,0 -> torch cuda:0 is the 4090.
    nv = fake_nvml([(f"GPU-{U0}", "NVIDIA GeForce RTX 3070", 8 * GiB, 1 * GiB),
                    (f"GPU-{U1}", "NVIDIA GeForce RTX 4090", 24 * GiB, 20 * GiB)])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    cuda_visible([(U1, "NVIDIA GeForce RTX 4090", 19 * GiB, 24 * GiB), (U0, "NVIDIA GeForce RTX 3070", 1 * GiB, 8 * GiB)],
                 reserved=3 * GiB, active=1 * GiB)
    s = probe()
    assert s.source == "nvml"
    assert s.name == "NVIDIA GeForce RTX 4090"
    assert s.free_bytes == 20 * GiB and s.total_bytes == 24 * GiB
    assert s.torch_reusable_bytes == 2 * GiB and s.torch_fragmented_bytes == 0
    assert s.available_bytes == 22 * GiB
    s1 = probe("cuda:1")
    assert s1.name == "NVIDIA GeForce RTX 3070" and s1.free_bytes == 1 * GiB
    assert nv.calls["init"] == nv.calls["shutdown"] == 2


def test_nvml_absent_falls_back_to_torch(cuda_visible, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    cuda_visible([(U0, "AMD Radeon RX 7900", 5 * GiB, 24 * GiB)])
    s = probe()
    assert s.source == "torch"
    assert s.free_bytes == 5 * GiB
    assert "NVML unavailable" in s.note and "nvidia-ml-py" in s.note


def test_nvml_init_failure_and_unknown_uuid(cuda_visible, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_error=RuntimeError("driver not loaded")))
    cuda_visible([(U0, "NVIDIA GeForce RTX 3070", 2 * GiB, 8 * GiB)])
    s = probe()
    assert s.source == "torch" and "driver not loaded" in s.note
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([(f"GPU-{U1}", "other", 8 * GiB, 7 * GiB)]))
    s = probe()
    assert s.source == "torch" and "UUID" in s.note and s.free_bytes == 2 * GiB


def test_no_cuda_is_cpu_and_never_raises(monkeypatch):
    monkeypatch.delenv(gpumod.ENV_SIMULATE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = probe()
    assert s.source in ("cpu", "mps")
    if s.source == "cpu":
        assert s.available_bytes == 0 and s.note


def test_torch_missing(monkeypatch):
    monkeypatch.delenv(gpumod.ENV_SIMULATE, raising=False)
    monkeypatch.setattr(gpumod, "_torch", lambda: ImportError("No module named 'torch'"))
    s = probe()
    assert s.source == "cpu" and "torch unavailable" in s.note


def test_cuda_query_raising_is_reported(monkeypatch):
    monkeypatch.delenv(gpumod.ENV_SIMULATE, raising=False)

    def boom():
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    s = probe()
    assert s.source in ("cpu", "mps") and "insufficient" in s.note


def test_simulation_env(monkeypatch):
    monkeypatch.setenv(gpumod.ENV_SIMULATE, "name=NVIDIA GeForce RTX 3070,free_gib=1.0,total_gib=8")
    s = probe()
    assert s.simulated and s.source == "simulated" and s.free_bytes == GiB and s.total_bytes == 8 * GiB
    assert "SIMULATE" in s.note


@pytest.mark.parametrize("spec", ["free_gib=abc", "name=x,free_gib=-1", "name=x,bogus=1", "free_gib",
                                  "name=x,free_gib=9,total_gib=8"])
def test_bad_simulation_spec_names_the_key(spec):
    from hybrid_vae.policy import ProfileError
    with pytest.raises(ProfileError) as ei:
        parse_simulation(spec)
    assert gpumod.ENV_SIMULATE in str(ei.value)


def test_policy_import_is_light():
    import subprocess
    code = ("import sys, policy, policy.decide, policy.gpu, policy.estimate; "
            "bad = [m for m in ('torch', 'diffusers', 'requests') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_probe_reads_the_caches_fragmented_part(cuda_visible, monkeypatch):
    """PyTorch's inactive split bytes (free blocks in segments that hold live tensors) are the cache's part a large
    block cannot come from: the probe reads them (at most the reusable cache) and does not count them."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([(f"GPU-{U1}", "NVIDIA GeForce RTX 4090", 24 * GiB, 20 * GiB)]))
    cuda_visible([(U1, "NVIDIA GeForce RTX 4090", 19 * GiB, 24 * GiB)], reserved=3 * GiB, active=1 * GiB,
                 split=int(0.5 * GiB))
    s = probe()
    assert (s.torch_reusable_bytes, s.torch_fragmented_bytes) == (2 * GiB, int(0.5 * GiB))
    assert s.available_bytes == int(21.5 * GiB)
    cuda_visible([(U1, "NVIDIA GeForce RTX 4090", 19 * GiB, 24 * GiB)], reserved=3 * GiB, active=1 * GiB, split=5 * GiB)
    assert probe().torch_fragmented_bytes == 2 * GiB and probe().available_bytes == 20 * GiB


def test_capped_takes_the_cache_first_then_free_memory():
    from hybrid_vae.policy.gpu import GpuState

    g = GpuState(name="x", total_bytes=100, free_bytes=50, source="nvml", torch_reusable_bytes=30, note="n")
    assert g.capped(90, "why") is g  # already under
    c = g.capped(60, "claim refused")
    assert (c.free_bytes, c.torch_reusable_bytes, c.available_bytes) == (50, 10, 60) and c.note == "n; claim refused"
    c = g.capped(20, "claim refused")
    assert (c.free_bytes, c.torch_reusable_bytes, c.available_bytes) == (20, 0, 20)
    assert g.capped(-5, "w").available_bytes == 0
