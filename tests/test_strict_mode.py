"""A bug must not look like an out-of-memory: the decode loop sorts a plan's exception (``error_kind``);
a programming error is raised in strict mode (the test suite's default, tests/conftest.py) and otherwise
reported as an internal error while the next plan still delivers the image. Also: a float16 decode asked
of a VAE whose config forces an upcast (the stock SDXL VAE) runs in float32 and says so."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from hybrid_vae.extension import executors
from hybrid_vae.extension.fixture import build_tiny_vae
from hybrid_vae.extension.orchestrator import ENV_STRICT, HybridDecoder, NonFiniteOutputError, error_kind
from hybrid_vae.policy import parse_simulation
from hybrid_vae.policy.errors import PlanError, RemoteStatusError
from hybrid_vae.policy.estimate import upcast_dtype

BIG = "name=NVIDIA GeForce RTX 3070,total_gib=8,free_gib=8"


def _z() -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def buggy_full(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The full-decode executor gets a real programming error: it calls the decoder with a keyword the
    function does not take (a TypeError raised by Python, not a constructed exception)."""
    calls: list[int] = []
    real = executors._full

    def broken(vae, z, *, slice_batch, progress):
        calls.append(1)
        return real(vae, z, slice_batch=slice_batch, progress=progress, tile_overlap=0.25)  # no such keyword

    monkeypatch.setattr(executors, "_full", broken)
    return calls


def test_the_suite_runs_in_strict_mode() -> None:
    assert os.environ.get(ENV_STRICT) == "1"


def test_strict_mode_raises_a_type_error_in_an_executor(buggy_full: list[int], tmp_path) -> None:
    dec = HybridDecoder(probe=lambda: parse_simulation(BIG), latent_dir=tmp_path)  # strict from the env
    with pytest.raises(TypeError, match="tile_overlap"):
        dec.decode(_z(), build_tiny_vae("sd15"), family="sd15")
    assert buggy_full == [1] and not list(tmp_path.iterdir())  # raised at once, nothing saved


def test_without_strict_mode_a_type_error_is_an_internal_error_and_the_next_plan_decodes(
        buggy_full: list[int], tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    vae = build_tiny_vae("sd15")
    dec = HybridDecoder(probe=lambda: parse_simulation(BIG), latent_dir=tmp_path, strict=False)
    with caplog.at_level(logging.WARNING, logger="hybrid_vae"):
        res = dec.decode(_z(), vae, family="sd15")
    r = res.report
    assert r.chosen.path == "full" and r.ran.path == "tiled" and r.fell_back
    label, err, _ = r.attempts[0]
    assert label == "full" and err.startswith("internal error: TypeError:") and "tile_overlap" in err
    assert "out of memory" not in err
    assert "fell back from full (internal error: TypeError:" in r.infotext()
    assert r.to_dict()["attempts"][0]["error"] == err
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1 and "internal error in full" in errors[0].getMessage() and errors[0].exc_info is not None
    with torch.no_grad():  # the image is still delivered, and it is the right one (exact tiles = full decode)
        want = vae.decode(_z() / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(res.tensor, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("exc", "kind"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), "oom"),
    (RuntimeError("HIP out of memory"), "oom"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), "backend"),
    (NotImplementedError("Could not run 'aten::foo' with arguments from the 'MPS' backend"), "backend"),
    (NonFiniteOutputError("NaN"), "backend"),
    (RemoteStatusError("busy", endpoint="http://x", status=503), "remote"),
    (PlanError("cannot tile"), "plan"),
    (TypeError("f() got an unexpected keyword argument"), "internal"),
    (AttributeError("'NoneType' object has no attribute 'shape'"), "internal"),
    (KeyError("sd15"), "internal"),
])
def test_error_kinds(exc: BaseException, kind: str) -> None:
    assert error_kind(exc) == kind


def test_nan_output_is_a_backend_failure_and_the_next_plan_runs(monkeypatch, tmp_path) -> None:
    """A plan that returns NaN pixels (what a float16 overflow gives) is not an image: the next plan runs."""
    real = executors._full

    def nan_full(vae, z, *, slice_batch, progress):
        return real(vae, z, slice_batch=slice_batch, progress=progress) * float("nan")

    monkeypatch.setattr(executors, "_full", nan_full)
    res = HybridDecoder(probe=lambda: parse_simulation(BIG), latent_dir=tmp_path).decode(
        _z(), build_tiny_vae("sd15"), family="sd15")
    r = res.report
    assert r.attempts[0][0] == "full" and "NaN/inf" in r.attempts[0][1] and r.ran.path == "tiled"
    assert bool(torch.isfinite(res.tensor).all())


# ---- float16 on an fp16-unsafe VAE ------------------------------------------------------------------------

def test_upcast_rule() -> None:
    assert upcast_dtype("float16", True)[0] == "float32" and "force_upcast" in (upcast_dtype("float16", True)[1] or "")
    assert upcast_dtype("float16", False) == ("float16", None)
    assert upcast_dtype("bfloat16", True) == ("bfloat16", None)  # float32's range: no overflow
    assert upcast_dtype(None, True) == (None, None)


def test_float16_asked_of_a_force_upcast_vae_decodes_in_float32(tmp_path, caplog) -> None:
    """The stock SDXL VAE's config sets force_upcast (it makes NaNs in float16); SD.Next and diffusers'
    pipelines decode it in float32 whatever the model's dtype. The engine does the same: the job, the plan
    and the infotext say float32, and a warning says why."""
    vae = build_tiny_vae("sdxl")
    vae.register_to_config(force_upcast=True)
    with caplog.at_level(logging.WARNING, logger="hybrid_vae"):
        res = HybridDecoder(probe=lambda: parse_simulation(BIG), latent_dir=tmp_path).decode(
            _z(), vae, family="sdxl", dtype="float16")
    r = res.report
    assert r.decision.job.dtype == "float32" and r.ran.dtype == "float32"
    assert r.notes and "force_upcast" in r.notes[0] and "float16 upcast to float32" in r.infotext()
    assert any("float16 asked for, decoded in float32" in rec.getMessage() for rec in caplog.records)
    fixed = build_tiny_vae("sdxl")
    fixed.register_to_config(force_upcast=False)  # an fp16-fix VAE: float16 stays
    res = HybridDecoder(probe=lambda: parse_simulation(BIG), latent_dir=tmp_path).decode(
        _z(), fixed, family="sdxl", dtype="float16")
    assert res.report.decision.job.dtype == "float16" and not res.report.notes
