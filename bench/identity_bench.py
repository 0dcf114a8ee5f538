"""Endpoint identity (``extension/identity.py``): what the canary costs and where its threshold sits.

::

    python -m hybrid_vae.bench.identity_bench            # writes the "identity_bench" section of docs/benchmarks.md
    python -m hybrid_vae.bench.identity_bench --sd-size  # also the cost with an SD-size (83 M parameter) VAE

1. **Cost.** ``hybrid-vae serve`` (the trained fixture VAE, CPU) on loopback in this process; a 512 px remote
   decode (``raw``, what a remote plan asks for) against one identity check (the canary's remote request, the
   local canary decode, the comparison and the verdict written to a fresh cache file). Medians of ``--n`` runs,
   in one run, so the ratio holds on this machine whatever its absolute speed.
2. **Threshold.** The canary's 8-bit PSNR between the fixture (float32, the "local" VAE) and VAEs an endpoint
   could serve: the same weights in other dtypes, with relative weight noise, a decoder-only fine-tune of the
   fixture on a picture it never saw (30 and 300 steps), other weights of the same architecture. The answer
   key is what the user would see: the PSNR of a real picture (the astronaut, encoded by the fixture) decoded
   by both VAEs; the endpoint is interchangeable with the local VAE when that picture PSNR reaches the
   threshold too. The key does not come from the code being judged (no canary in it, a real picture).
3. **Fingerprint cost** of :func:`extension.identity.weights_fingerprint` on the fixture (1 M parameters) and on
   an SD-size VAE (83 M), against hashing every weight byte.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hybrid_vae.bench.report import write_section

SECTION = "identity_bench"


def _median_s(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sd_size_vae() -> Any:
    """An SD1.5-config AutoencoderKL (83 M parameters) with random weights (seed 0)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                         norm_num_groups=32, scaling_factor=0.18215).eval()


def _cost_one(label: str, vae: Any, path: str, n: int, tmp: Path) -> dict[str, Any]:
    """One served VAE: median 512 px remote raw decode, median identity check (fresh cache each), fingerprint."""
    import torch
    from hybrid_vae.extension.executors import run_plan
    from hybrid_vae.extension.identity import IdentityChecker, IdentityStore, weights_fingerprint
    from hybrid_vae.extension.latents import to_vae_space
    from hybrid_vae.extension.remote import RemoteClient
    from hybrid_vae.policy import DecodeJob, Estimate, Plan, load_profiles
    from hybrid_vae.server.cli import build_app
    from hybrid_vae.server.testing import DEMO_CONFIG, serve_in_thread

    fam = load_profiles().family("sd15")
    est = Estimate(peak_bytes=0, seconds=0.0, peak_source="-", seconds_source="-")
    fp = weights_fingerprint(vae)
    assert fp is not None
    cfg = {**DEMO_CONFIG, "families": {"sd15": path}, "demo": False}
    with serve_in_thread(build_app(cfg, None)) as base:
        url = f"{base}/sd15"
        client = RemoteClient(max_retries=0, read_timeout_s=600)
        z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))

        def remote(c: torch.Tensor) -> torch.Tensor:
            h, w = c.shape[-2] * 8, c.shape[-1] * 8
            plan = Plan(path="remote", dtype="float32", endpoint=url, response_format="raw", estimate=est)
            return client.decode(c, plan=plan, job=DecodeJob("sd15", w, h), family=fam, deadline_s=600,
                                 height=h, width=w).tensor

        def local(c: torch.Tensor) -> torch.Tensor:
            return run_plan(Plan(path="full", dtype="float32", estimate=est), vae, to_vae_space(c, fam), family=fam)

        def check() -> None:
            checker = IdentityChecker(IdentityStore(tmp / f"identity-{time.perf_counter_ns()}.json"))  # a real canary
            v = checker.check(endpoint=url, family="sd15", fingerprint=fp, fam=fam, decode_local=local,
                              decode_remote=remote)
            assert v.verdict == "same", v

        remote(z)  # warm-up: the server loads its VAE, the connection opens
        t_decode = _median_s(lambda: remote(z), n)
        t_check = _median_s(check, n)
        client.close()
    return {"vae": label, "decode_s": t_decode, "check_s": t_check, "ratio": t_check / t_decode}


def cost(n: int, *, sd_size: bool) -> list[dict[str, Any]]:
    """Median seconds of a 512 px remote raw decode and of one identity check, per served VAE."""
    from hybrid_vae.extension.fixture import FIXTURE_DIR, load_fixture_vae

    tmp = Path(tempfile.mkdtemp(prefix="identity-bench-"))
    rows = [_cost_one("fixture (1 M parameters)", load_fixture_vae(), str(FIXTURE_DIR), n, tmp)]
    if sd_size:
        big = _sd_size_vae()
        big.save_pretrained(tmp / "sd-size")
        rows.append(_cost_one("SD-size random weights (83 M)", big, str(tmp / "sd-size"), max(1, n // 3), tmp))
    return rows


def _finetune(vae: Any, steps: int, seed: int = 0) -> Any:
    """A decoder-only fine-tune (as sd-vae-ft-mse was made from the SD VAE): MSE on 64 px crops of a picture the
    fixture never saw in training, Adam at 1e-4, encoder frozen."""
    import copy

    import numpy as np
    import torch
    from hybrid_vae.extension.fixture import fixture_image

    ft = copy.deepcopy(vae).train()
    img = torch.from_numpy(np.asarray(fixture_image("astronaut", 256), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(ft.decoder.parameters(), lr=1e-4)
    for _ in range(steps):
        ys = torch.randint(0, 256 - 64, (4,), generator=g).tolist()
        xs = torch.randint(0, 256 - 64, (4,), generator=g).tolist()
        batch = torch.stack([img[:, y:y + 64, x:x + 64] for y, x in zip(ys, xs, strict=True)])
        with torch.no_grad():
            lat = ft.encode(batch).latent_dist.mode()
        loss = torch.nn.functional.mse_loss(ft.decode(lat).sample, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ft.eval()


def threshold() -> list[dict[str, Any]]:
    """Canary PSNR and picture PSNR of candidate endpoint VAEs against the fixture in float32."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from hybrid_vae.extension.fixture import build_tiny_vae, fixture_image, load_fixture_vae
    from hybrid_vae.extension.identity import DEFAULT_MIN_PSNR_DB, canary_latent, psnr_8bit
    from hybrid_vae.extension.latents import to_vae_space
    from hybrid_vae.policy import load_profiles

    fam = load_profiles().family("sd15")
    local = load_fixture_vae()
    canary = to_vae_space(canary_latent(fam), fam)
    img = torch.from_numpy(np.asarray(fixture_image("astronaut", 256), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        picture = local.encode(img).latent_dist.mode()

    def dec(vae: Any, z: torch.Tensor) -> torch.Tensor:
        p = next(vae.parameters())
        with torch.no_grad():
            return vae.decode(z.to(p.dtype)).sample.float()

    ref_c, ref_p = dec(local, canary), dec(local, picture)

    def noisy(rel: float) -> Any:
        v = load_fixture_vae()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in v.parameters():
                p.add_(torch.randn(p.shape, generator=g) * p.std().clamp_min(1e-8) * rel)
        return v

    def other_seed(seed: int) -> Any:
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(local.config).eval()

    variants: list[tuple[str, Any]] = [
        ("same weights, float32", lambda: load_fixture_vae()),
        ("same weights, bfloat16", lambda: load_fixture_vae(dtype=torch.bfloat16)),
        ("same weights, float16", lambda: load_fixture_vae(dtype=torch.float16)),
        ("weights + 0.1% noise", lambda: noisy(1e-3)),
        ("weights + 3% noise", lambda: noisy(3e-2)),
        ("weights + 10% noise", lambda: noisy(1e-1)),
        ("decoder fine-tuned 30 steps", lambda: _finetune(local, 30)),
        ("decoder fine-tuned 300 steps", lambda: _finetune(local, 300)),
        ("other weights, same architecture (seed 1)", lambda: other_seed(1)),
        ("tiny random SD1.5-layout VAE (build_tiny_vae)", lambda: build_tiny_vae("sd15")),
    ]
    rows = []
    for label, make in variants:
        v = make()
        try:
            c = psnr_8bit(ref_c, dec(v, canary))
            p = psnr_8bit(ref_p, dec(v, picture))
        except (RuntimeError, ValueError) as exc:  # e.g. a dtype the CPU cannot convolve in
            rows.append({"variant": label, "error": str(exc).splitlines()[0][:80]})
            continue
        rows.append({"variant": label, "canary_db": c, "picture_db": p, "interchangeable": p >= DEFAULT_MIN_PSNR_DB,
                     "verdict": "same" if c >= DEFAULT_MIN_PSNR_DB else "other"})
    return rows


def fingerprint_cost(n: int) -> list[dict[str, Any]]:
    import torch
    from hybrid_vae.extension.fixture import load_fixture_vae
    from hybrid_vae.extension.identity import weights_fingerprint

    rows = []
    for label, vae in (("fixture", load_fixture_vae()), ("SD-size (83 M)", _sd_size_vae())):
        sd = vae.state_dict()

        def full_hash(sd: dict[str, Any] = sd) -> None:
            h = hashlib.sha256()
            for k in sorted(sd):
                h.update(sd[k].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())

        rows.append({"vae": label, "params": sum(p.numel() for p in vae.parameters()), "tensors": len(sd),
                     "fingerprint_ms": 1000 * _median_s(lambda v=vae: weights_fingerprint(v), n),
                     "full_hash_ms": 1000 * _median_s(full_hash, max(1, n // 2))})
    return rows


def render(costs: list[dict[str, Any]], thr: list[dict[str, Any]], fps: list[dict[str, Any]]) -> str:
    from hybrid_vae.extension.identity import CANARY_LATENT_PX, DEFAULT_MIN_PSNR_DB

    px = CANARY_LATENT_PX * 8
    lines = ["## Endpoint identity: canary cost and threshold", "",
             f"Before the first remote decode for an (endpoint, VAE) pair the engine decodes a seeded random {px}x{px} px "
             "canary locally and on the endpoint and compares the 8-bit images (`extension/identity.py`). "
             "Measured by `python -m hybrid_vae.bench.identity_bench` (all numbers measured on this machine, CPU, "
             "`hybrid-vae serve` in the same process on 127.0.0.1).", "",
             "**Cost** (medians): one identity check against one 512 px remote `raw` decode.", "",
             "| served VAE | 512 px remote decode | identity check | check / decode |", "|---|---:|---:|---:|"]
    for r in costs:
        lines.append(f"| {r['vae']} | {r['decode_s'] * 1000:.0f} ms | {r['check_s'] * 1000:.1f} ms | {r['ratio']:.1%} |")
    if len(costs) > 1:
        big, small = costs[-1], costs[0]
        lines += ["", f"With an SD-size VAE (the class of VAE the endpoints serve) one check costs {big['ratio']:.1%} of one "
                  f"512 px remote decode. The 1 M-parameter fixture decodes 512 px in {small['decode_s'] * 1000:.0f} ms "
                  f"here, so the check's fixed costs (an HTTP round trip, a {px} px decode) weigh {small['ratio']:.1%} "
                  "with it; on a 2-core CPU that also runs the server, this row moves with the machine's load."]
    lines += ["", "The check runs once per pair (then the verdict is read from the cache file); its parts: one "
              f"{px} px remote request and, while it is answered, one {px} px local decode, the PSNR, one small file "
              "write. The fingerprint that keys the cache is computed on every decode that could go remote (next "
              "table).", "",
              f"**Threshold** ({DEFAULT_MIN_PSNR_DB:g} dB on the canary). Local VAE: the trained fixture in float32. "
              "*picture* = PSNR of the astronaut (256 px, encoded by the fixture) decoded by both VAEs: what the user "
              f"would see, and the answer key (interchangeable when it reaches {DEFAULT_MIN_PSNR_DB:g} dB too).", "",
              "| endpoint's VAE | picture PSNR | interchangeable? | canary PSNR | verdict |", "|---|---:|---|---:|---|"]
    scored = [r for r in thr if "error" not in r]
    for r in thr:
        if "error" in r:
            lines.append(f"| {r['variant']} | - | - | - | not run: {r['error']} |")
            continue
        ok = (r["verdict"] == "same") == r["interchangeable"]
        lines.append(f"| {r['variant']} | {r['picture_db']:.1f} dB | {'yes' if r['interchangeable'] else 'no'} | "
                     f"{r['canary_db']:.1f} dB | {r['verdict']}{'' if ok else ' (WRONG)'} |")
    if scored:
        agree = sum((r["verdict"] == "same") == r["interchangeable"] for r in scored)
        gap = max(abs(r["canary_db"] - r["picture_db"]) for r in scored if r["picture_db"] < 100)
        yes = [r["canary_db"] for r in scored if r["interchangeable"]]
        no = [r["canary_db"] for r in scored if not r["interchangeable"]]
        lines += ["", f"The verdict agrees with the picture in {agree} of {len(scored)} rows; canary and picture PSNR "
                  f"differ by at most {gap:.1f} dB (below 100 dB)"
                  + (f"; interchangeable VAEs score >= {min(yes):.1f} dB on the canary, the others <= {max(no):.1f} dB"
                     if yes and no else "")
                  + ". 'Same' therefore means *decodes like your VAE* (a slightly perturbed copy can pass), not "
                  "*bit-identical weights*; raise `min_psnr_db` for a stricter check. The real-ComfyUI run "
                  "(docs/hosts.md) adds two SD-size VAEs."]
    lines += ["", "**Fingerprint** (`weights_fingerprint`: name, shape, dtype and 16 sampled values per tensor) "
              "against hashing every weight byte:", "",
              "| VAE | parameters | tensors | fingerprint | full SHA-256 |", "|---|---:|---:|---:|---:|"]
    for r in fps:
        lines.append(f"| {r['vae']} | {r['params'] / 1e6:.1f} M | {r['tensors']} | {r['fingerprint_ms']:.1f} ms | "
                     f"{r['full_hash_ms']:.0f} ms |")
    lines += ["", "The fingerprint's cost follows the number of tensors, not their size. Its limit: an edit that "
              "changes only unsampled values (one element of one weight) keeps the fingerprint; a fine-tune, merge, "
              "LoRA patch or dtype change moves the sampled values and triggers a new check (tested in "
              "tests/test_identity.py)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=9, help="runs per median (a third of them for the SD-size VAE)")
    p.add_argument("--sd-size", action="store_true", help="also measure the cost with an SD-size VAE (slow on a CPU)")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing docs/benchmarks.md")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n {a.n}: give at least 1")
    body = render(cost(a.n, sd_size=a.sd_size), threshold(), fingerprint_cost(a.n))
    if a.no_write:
        print(body)
    else:
        print(f"wrote {write_section(SECTION, body)}")
        print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
