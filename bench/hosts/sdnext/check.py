"""Evidence that hybrid-vae behaves inside a real SD.Next (the one setup.sh built, started by launch.sh).

usage: python check.py ROOT PHASE [--out DIR]

PHASE ``plain``: SD.Next started plainly (no simulated GPU, SD.Next's default --debug console, nvidia-ml-py installed by
the extension's install.py). PHASE ``simulated``: SD.Next restarted with QUIET=1 (console at INFO),
HYBRID_VAE_SIMULATE_GPU set and nvidia-ml-py uninstalled (a missing optional dependency). Each step talks to SD.Next's
API on 127.0.0.1:$SDNEXT_PORT (default 7861), reads its console (ROOT/console.log) and log file
(ROOT/sdnext/sdnext.log) and hybrid-vae's decision log, checks what it expects, and writes what it saw to
DIR/<phase>.json (default ROOT/evidence). Exits 1 when a check fails; every check is listed with ok/FAILED.
Run it with a Python that has the project installed with its [server] extra (it starts ``python -m hybrid_vae
serve --demo`` as a live sd15 endpoint; or set HV_PYTHON to one) and Pillow/numpy (pixel comparisons). SD.Next's own Python runs
the saved-latent command printed in SD.Next's log.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BASE = f"http://127.0.0.1:{os.environ.get('SDNEXT_PORT', '7861')}"
TINY = "Diffusers/tiny-sd"
TINY_2X = "Diffusers/tiny-sd-tinyvae"


class Host:
    def __init__(self, root: Path, out: Path) -> None:
        self.root, self.out = root, out
        self.console = root / "console.log"
        self.logfile = root / "sdnext" / "sdnext.log"
        self.decisions = root / "D" / "hybrid-vae" / "decisions.jsonl"
        self.results: list[dict] = []

    # ---- SD.Next API ------------------------------------------------------------------------------
    def call(self, path: str, data: dict | None = None, timeout: float = 900) -> object:
        req = urllib.request.Request(BASE + path, data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"},
                                     method="GET" if data is None else "POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode() or "null")

    def set(self, **opts: object) -> None:
        self.call("/sdapi/v1/options", opts)

    def model(self, name: str) -> None:
        if self.call("/sdapi/v1/options").get("sd_model_checkpoint") != name:  # type: ignore[union-attr]
            self.set(sd_model_checkpoint=name)

    def txt2img(self, size: int = 64, mode: str | None = None, tag: str = "img") -> tuple[str, list[str]]:
        """Generate one image; returns its ``Hybrid VAE`` infotext value ("" when absent) and the full infotexts."""
        body: dict = {"prompt": "a photo of a red house", "width": size, "height": size, "steps": 1, "seed": 1234,
                      "sampler_name": "Default"}
        if mode is not None:
            body["alwayson_scripts"] = {"Hybrid VAE": {"args": [mode]}}
        try:
            r = self.call("/sdapi/v1/txt2img", body)
        except urllib.error.HTTPError as exc:  # e.g. SD.Next's answer when a decode returned nothing
            return "", [f"HTTP {exc.code}: {exc.read()[:300]!r}"]
        assert isinstance(r, dict)
        info = json.loads(r.get("info") or "{}")
        texts = info.get("infotexts") or []
        for i, b64 in enumerate(r.get("images") or []):
            (self.out / "images").mkdir(parents=True, exist_ok=True)
            (self.out / "images" / f"{tag}-{i}.png").write_bytes(base64.b64decode(b64))
        m = re.search(r'Hybrid VAE: "((?:[^"\\]|\\.)*)"', texts[0]) if texts else None
        m = m or (re.search(r"Hybrid VAE: ([^,]*(?:, [^:,]*)*)", texts[0]) if texts else None)
        return (m.group(1) if m else ""), texts

    # ---- logs -------------------------------------------------------------------------------------------
    def mark(self) -> tuple[int, int]:
        return (self.console.stat().st_size if self.console.exists() else 0,
                self.logfile.stat().st_size if self.logfile.exists() else 0)

    def since(self, mark: tuple[int, int]) -> tuple[list[str], list[str]]:
        """Console lines (rich wraps long lines: joined back) and log-file lines written after ``mark``."""
        time.sleep(1.0)
        con = self.console.read_bytes()[mark[0]:].decode("utf-8", "replace") if self.console.exists() else ""
        joined, cur = [], ""
        for raw in con.splitlines():
            if re.match(r"^\d\d:\d\d:\d\d-\d+ ", raw):
                if cur:
                    joined.append(cur)
                cur = raw.rstrip()
            else:
                cur += " " + raw.strip()
        if cur:
            joined.append(cur)
        log = self.logfile.read_bytes()[mark[1]:].decode("utf-8", "replace").splitlines() if self.logfile.exists() else []
        return joined, log

    def last_decision(self) -> dict:
        lines = self.decisions.read_text(encoding="utf-8").splitlines() if self.decisions.exists() else []
        return json.loads(lines[-1]) if lines else {}

    # ---- checks -----------------------------------------------------------------------------------------
    def check(self, name: str, ok: bool, **evidence: object) -> bool:
        self.results.append({"check": name, "ok": bool(ok), **evidence})
        print(f"{'ok     ' if ok else 'FAILED '} {name}")
        for k, v in evidence.items():
            text = json.dumps(v, default=str) if not isinstance(v, str) else v
            print(f"          {k}: {text[:600]}")
        return bool(ok)


def max_abs_diff(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (a, b))
    return int(np.abs(x - y).max()) if x.shape == y.shape else 999


def grep(lines: list[str], *needles: str) -> list[str]:
    return [ln for ln in lines if all(n in ln for n in needles)]


def phase_plain(h: Host) -> None:
    info = h.call("/sdapi/v1/options-info")
    opts = info["options"] if isinstance(info, dict) and "options" in info else info  # type: ignore[index]
    ours = {k: v for k, v in opts.items() if k.startswith("hybrid_vae_")}  # type: ignore[union-attr]
    h.check("14 settings, every label names the extension (SD.Next's search matches the shown text)",
            len(ours) == 14 and all("hybrid" in v["label"].lower() for v in ours.values()),
            labels={k: v["label"] for k, v in ours.items()})
    tok = ours.get("hybrid_vae_hf_token", {})
    h.check("the token option is secret in /sdapi/v1/options-info", tok.get("is_secret") is True,
            hybrid_vae_hf_token={k: tok.get(k) for k in ("is_secret", "component", "default")},
            huggingface_token_of_sdnext={k: opts.get("huggingface_token", {}).get(k) for k in ("is_secret",)})  # type: ignore[union-attr]
    boot_con, boot_log = h.since((0, 0))
    h.check("decode hook installed: INFO in SD.Next's log file and console",
            bool(grep(boot_log, "| hybrid_vae.sdnext | INFO |", "decode hook installed"))
            and bool(grep(boot_con, "hybrid-vae: decode hook installed")),
            log_file=grep(boot_log, "| hybrid_vae.sdnext | INFO |", "decode hook installed")[-1:],
            console=grep(boot_con, "decode hook installed")[-1:])
    requested = grep(boot_log, "Model requested")
    h.check("no model requested by hybrid-vae while SD.Next loads its scripts",
            not any("hybrid" in ln or "sdnext.py" in ln for ln in requested), model_requested_lines=requested[-5:])
    nvml = subprocess.run([str(h.root / "venv" / "bin" / "python"), "-c", "import pynvml, importlib.metadata as m; "
                           "print(m.version('nvidia-ml-py'))"], capture_output=True, text=True, timeout=120)
    h.check("this start was a full launch and ran the extension's install.py; nvidia-ml-py is in SD.Next's venv",
            bool(grep(boot_con, "Startup: launch=full")) and bool(grep(boot_con, "Extension installer", "sdnext-hybrid-vae"))
            and nvml.returncode == 0,
            console=grep(boot_con, "Startup: launch=")[-1:] + grep(boot_con, "Extension installer", "sdnext-hybrid-vae")[-1:],
            nvidia_ml_py=nvml.stdout.strip() or nvml.stderr.strip()[-200:],
            installed_by_install_py_on_the_first_start=grep(boot_log, "Extension installed packages: sdnext-hybrid-vae"))

    h.model(TINY)
    h.set(samples_format="png",  # SD.Next's API answers in this format (default jpg: lossy, pixels not comparable)
          hybrid_vae_decision_log=True, hybrid_vae_allow_remote=False, hybrid_vae_endpoints="",
          hybrid_vae_builtin_endpoints=False, hybrid_vae_mode="auto", hybrid_vae_enabled=True)
    m = h.mark()
    line, _ = h.txt2img(64, tag="cpu")
    con, log = h.since(m)
    h.check("a cpu decode's infotext says it was a full decode", line.startswith("cpu full decode, no GPU"),
            infotext=line)
    learn, learned_file = ours.get("hybrid_vae_learn", {}), h.root / "D" / "hybrid-vae" / "learned.json"
    h.check("learning is on by default, and a CPU decode learns nothing (no learned.json in <data>/hybrid-vae)",
            learn.get("default") is True and not learned_file.exists(),
            hybrid_vae_learn={k: learn.get(k) for k in ("default", "component", "label")},
            learned_file=str(learned_file), exists=learned_file.exists())
    info_file = h.root / "D" / "hv-host-info.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.exists() else {}
    ext = str(h.root / "D" / "extensions" / "sdnext-hybrid-vae")
    h.check("one import name: hybrid_vae is the extension folder, nothing of it on sys.path or as a top-level module",
            str(info.get("hybrid_vae_file", "")) == ext + "/__init__.py" and info.get("extension_on_sys_path") is False
            and info.get("top_level_modules_from_the_extension") == [], **info)
    h.set(hybrid_vae_enabled=False)
    own, _ = h.txt2img(64, tag="sdnext-own")
    h.set(hybrid_vae_enabled=True)
    diff = max_abs_diff(h.out / "images" / "cpu-0.png", h.out / "images" / "sdnext-own-0.png")
    h.check("hybrid-vae's full decode gives SD.Next's own pixels (extension off: same generation, max diff 0)",
            diff == 0 and own == "", max_abs_diff=diff)
    h.check("one INFO line per decode with the decision log on (console and log file)",
            len(grep(log, "| hybrid_vae.orchestrator | INFO |", "hybrid-vae: sd15 64x64: cpu full decode")) == 1
            and len(grep(con, "INFO", "hybrid-vae: sd15 64x64: cpu full decode")) == 1,
            log_file=grep(log, "hybrid_vae.orchestrator"), console=grep(con, "hybrid-vae: sd15"))

    # a typo narrows where images go: remote off for every family, never the built-in endpoints
    h.set(hybrid_vae_allow_remote=True, hybrid_vae_builtin_endpoints=True, hybrid_vae_remote_custom_vae=True,
          hybrid_vae_endpoints="sd15=ftp://bad, foo=http://x")
    m = h.mark()
    line, _ = h.txt2img(64, mode="remote", tag="typo")
    con, log = h.since(m)
    d = h.last_decision()
    attempts = [a["plan"] for a in d.get("report", {}).get("attempts", [])]
    h.check("an invalid endpoint setting turns remote off (infotext and SD.Next's log say so; no remote attempt)",
            "remote decode is off for every family until this setting is fixed" in line
            and not any(a.startswith("remote") for a in attempts)
            and bool(grep(log, "| WARNING |", "remote decode is off for every family")),
            infotext=line, attempts=attempts, log_file=grep(log, "| WARNING |", "hybrid_vae"))

    # family from the whole geometry: the 2x VAE is not SD1.5; a live sd15 endpoint is never used for it
    serve = subprocess.Popen([os.environ.get("HV_PYTHON", sys.executable), "-m", "hybrid_vae", "serve", "--demo",
                              "--host", "127.0.0.1", "--port", "8311"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                urllib.request.urlopen("http://127.0.0.1:8311/health", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                time.sleep(2)
        h.set(hybrid_vae_endpoints="sd15=http://127.0.0.1:8311/sd15", hybrid_vae_builtin_endpoints=False)
        line, _ = h.txt2img(64, mode="remote", tag="sd15-remote")
        h.check("contrast: the SD1.5-geometry model goes remote to the live sd15 endpoint when asked",
                line.startswith("remote ") and "127.0.0.1:8311" in line, infotext=line)
        h.model(TINY_2X)
        m = h.mark()
        line, _ = h.txt2img(64, mode="remote", tag="tinyvae")
        con, log = h.since(m)
        d = h.last_decision()
        rep = d.get("report", {})
        h.check("a VAE whose geometry matches no family: local, never remote, reason and infotext say so",
                d.get("family") == "unmatched" and "VAE matches no family: local only" in line
                and rep.get("remote") is None and "never remote" in rep.get("reason", ""),
                infotext=line, reason=rep.get("reason"),
                memory_model=rep.get("decision", {}).get("options", [{}])[0].get("estimate", {}).get("peak_source"))
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        h.model(TINY)
        h.set(hybrid_vae_allow_remote=False, hybrid_vae_endpoints="", hybrid_vae_remote_custom_vae=False)

    # every plan fails (test-only fault extension): latent saved, ERROR in SD.Next's log, the command works
    flag = h.root / "D" / "hv-fault-oom"
    flag.touch()
    try:
        m = h.mark()
        line, _ = h.txt2img(64, tag="failed")
        con, log = h.since(m)
    finally:
        flag.unlink()
    err = grep(log, "| hybrid_vae.sdnext | ERROR |", "latent is saved in")
    h.check("every plan failed: ERROR with the saved latent in SD.Next's log file and console",
            bool(err) and bool(grep(con, "ERROR", "latent is saved in")), infotext=line, log_file=err[-1:],
            console=grep(con, "latent is saved in")[-1:])
    cmd = re.search(r"`([^`]+)`", err[-1]).group(1) if err else ""  # type: ignore[union-attr]
    argv = shlex.split(cmd)
    png = h.out / "images" / "recovered.png"
    run = subprocess.run([*argv, "-o", str(png)], capture_output=True, text=True, timeout=900, cwd="/") \
        if argv else None
    h.check("the command in the message decodes the latent with SD.Next's own Python (no install step)",
            run is not None and run.returncode == 0 and png.is_file() and argv[0].startswith(str(h.root)),
            command=cmd, stdout=(run.stdout if run else "")[-600:], stderr=(run.stderr if run else "")[-400:])
    # the same generation again without the fault: SD.Next's image (decoded by hybrid-vae) = the recovered one
    again, _ = h.txt2img(64, tag="after-failure")
    diff = max_abs_diff(h.out / "images" / "after-failure-0.png", png) if png.is_file() else None
    h.check("the recovered image equals the image of the same generation without the fault (uint8 max diff <= 1)",
            diff is not None and diff <= 1, max_abs_diff=diff, infotext_of_the_repeat=again)


def phase_simulated(h: Host) -> None:
    boot_con, boot_log = h.since((0, 0))
    h.check("missing optional dependency (nvidia-ml-py uninstalled, quick launch): WARNING in console and log file",
            bool(grep(boot_log, "| hybrid_vae.sdnext | WARNING |", "pynvml is not installed"))
            and bool(grep(boot_con, "pynvml is not installed")) and bool(grep(boot_con, "Startup: launch=quick")),
            log_file=grep(boot_log, "| hybrid_vae.sdnext | WARNING |", "pynvml is not installed")[-1:],
            console=grep(boot_con, "pynvml")[-1:],
            launch=grep(boot_con, "Startup: launch=")[-1:])
    h.model(TINY)
    h.set(samples_format="png", hybrid_vae_decision_log=True, hybrid_vae_mode="auto", hybrid_vae_reserve_mib=128)
    m = h.mark()
    line, _ = h.txt2img(256, mode="tiled", tag="forced-tiled")
    con, log = h.since(m)
    h.check("simulated-GPU notice: WARNING in console and log file",
            bool(grep(log, "| hybrid_vae | WARNING |", "GPU SIMULATED")) and bool(grep(con, "GPU SIMULATED")),
            log_file=grep(log, "GPU SIMULATED")[-1:], console=grep(con, "GPU SIMULATED")[-1:])
    d = h.last_decision()
    h.check("forced tiled while full fits: the text says 'as requested', never 'budget < full'",
            line.startswith("tiled ") and "as requested" in line and "budget <" not in line
            and "full would fit too" in d.get("report", {}).get("reason", ""),
            infotext=line, reason=d.get("report", {}).get("reason"))
    h.set(hybrid_vae_reserve_mib=960)  # 1.0 GiB free - 0.94 GiB reserve: nothing fits the budget
    line, _ = h.txt2img(512, tag="squeezed")
    d = h.last_decision()
    reason = d.get("report", {}).get("reason", "")
    nums = re.search(r"needs ([\d.]+) GiB > ([\d.]+) GiB budget, <= ([\d.]+) GiB available", reason)
    h.check("a squeezed plan says needs > budget and <= available (and the numbers agree)",
            nums is not None and float(nums[1]) > float(nums[2]) and float(nums[1]) <= float(nums[3])
            and "squeezed into the reserve" in line, infotext=line, reason=reason)
    h.set(hybrid_vae_reserve_mib=128, hybrid_vae_decision_log=False)
    m = h.mark()
    line, _ = h.txt2img(64, tag="no-decision-log")
    con, log = h.since(m)
    h.check("decision log off: the per-decode line is DEBUG (once in the log file; console at INFO has none)",
            len(grep(log, "| hybrid_vae.orchestrator | DEBUG |", "hybrid-vae: sd15 64x64")) == 1
            and not grep(con, "hybrid-vae: sd15 64x64"), log_file=grep(log, "hybrid-vae: sd15 64x64"),
            console=grep(con, "hybrid-vae: sd15"))
    h.set(hybrid_vae_decision_log=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("phase", choices=["plain", "simulated"])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    out = a.out or a.root / "evidence"
    out.mkdir(parents=True, exist_ok=True)
    h = Host(a.root.resolve(), out)
    try:
        (phase_plain if a.phase == "plain" else phase_simulated)(h)
    finally:
        (out / f"{a.phase}.json").write_text(json.dumps(h.results, indent=2, default=str), encoding="utf-8")
    failed = [r["check"] for r in h.results if not r["ok"]]
    print(f"{len(h.results) - len(failed)}/{len(h.results)} checks ok" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
