"""``policy.env``: the one reader of ``HYBRID_VAE_*`` variables, its documented table, and that every consumer uses it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hybrid_vae.policy.env import Env, env_name, markdown_table, read_env
from hybrid_vae.policy.errors import EnvError, ProfileError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
START, END = "<!-- env-table:start -->", "<!-- env-table:end -->"


def test_docs_table_is_the_modules_table():
    """docs/configuration.md holds exactly :func:`markdown_table` (regenerate: see the comment above the table)."""
    text = DOC.read_text(encoding="utf-8")
    assert START in text and END in text
    documented = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert documented == markdown_table().strip(), "docs/configuration.md is stale: paste policy.env.markdown_table()"
    assert "docs/configuration.md" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_variable_named_in_the_repository_is_in_the_table():
    """A ``HYBRID_VAE_*`` name in code or docs that the table lacks (a new variable, a typo) fails here."""
    known = {f.alias for f in Env.model_fields.values()}
    seen: dict[str, str] = {}
    for path in [*ROOT.glob("**/*.py"), *ROOT.glob("**/*.md")]:
        if ".git" in path.parts or "node_modules" in path.parts:
            continue
        for name in re.findall(r"HYBRID_VAE_[A-Z][A-Z_]*[A-Z]", path.read_text(encoding="utf-8", errors="replace")):
            seen.setdefault(name, str(path.relative_to(ROOT)))
    unknown = {n: p for n, p in seen.items() if n not in known}
    assert not unknown, f"undocumented variables (add them to policy/env.py): {unknown}"
    assert known <= set(seen)


def test_no_module_reads_the_variables_itself():
    """Every read goes through :func:`read_env`; ``extension/comfyui/__init__.py`` reads HYBRID_VAE_ROOT to find the
    package before it can be imported (the one exception, stated in policy/env.py)."""
    read = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=)|environ\.get\(\s*ENV_")
    offenders = []
    for folder in ("policy", "extension", "server", "bench"):
        for path in (ROOT / folder).glob("**/*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in ("policy/env.py", "extension/comfyui/__init__.py"):
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if read.search(line) and ("HYBRID_VAE_" in line or "ENV_" in line):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, offenders


@pytest.mark.parametrize(("field", "value", "want"), [
    ("simulate_gpu", "name=NVIDIA GeForce RTX 3070,free_gib=1.0", "name=NVIDIA GeForce RTX 3070,free_gib=1.0"),
    ("profile", "/tmp/p.yaml", "/tmp/p.yaml"),
    ("learned", "~/l.json", "~/l.json"),
    ("identity", "/tmp/i.json", "/tmp/i.json"),
    ("strict", "Yes", True),
    ("strict", "off", False),
    ("token", "t0k", "t0k"),
    ("server_token", "s3rver", "s3rver"),
    ("serve_config", '{"families": {}}', '{"families": {}}'),
    ("family", "sdxl", "sdxl"),
    ("root", "/opt/hybrid-vae", "/opt/hybrid-vae"),
])
def test_a_variable_sets_the_field_it_documents(field, value, want):
    assert getattr(read_env({env_name(field): value, "OTHER": "x"}), field) == want
    assert getattr(read_env({env_name(field): "  "}), field) == Env.model_fields[field].default  # blank = unset


def test_read_at_call_time(monkeypatch):
    monkeypatch.delenv("HYBRID_VAE_PROFILE", raising=False)
    assert read_env().profile is None
    monkeypatch.setenv("HYBRID_VAE_PROFILE", "/x.yaml")
    assert read_env().profile == "/x.yaml"


def test_consumers_honour_the_variables(monkeypatch, tmp_path):
    """Each documented reader sees the variable through :func:`read_env`, set after import."""
    from hybrid_vae.extension.identity import IdentityStore
    from hybrid_vae.extension.orchestrator import _strict_from_env
    from hybrid_vae.policy.gpu import probe
    from hybrid_vae.policy.learned import default_path
    from hybrid_vae.policy.profiles import load_profiles

    monkeypatch.setenv("HYBRID_VAE_SIMULATE_GPU", "name=NVIDIA GeForce RTX 3070,free_gib=1.5,total_gib=8")
    assert probe().simulated and probe().name == "NVIDIA GeForce RTX 3070"
    monkeypatch.setenv("HYBRID_VAE_LEARNED", str(tmp_path / "l.json"))
    assert default_path() == tmp_path / "l.json"
    monkeypatch.setenv("HYBRID_VAE_IDENTITY", str(tmp_path / "i.json"))
    assert IdentityStore().path == tmp_path / "i.json"
    monkeypatch.setenv("HYBRID_VAE_STRICT", "0")
    assert _strict_from_env() is False
    monkeypatch.setenv("HYBRID_VAE_STRICT", "1")
    assert _strict_from_env() is True
    monkeypatch.setenv("HYBRID_VAE_PROFILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ProfileError, match=r"missing\.yaml"):
        load_profiles()


def test_a_bad_value_is_one_line_naming_variable_value_and_fix(monkeypatch):
    with pytest.raises(EnvError) as info:
        read_env({"HYBRID_VAE_STRICT": "maybe"})
    text = str(info.value)
    assert "\n" not in text and "HYBRID_VAE_STRICT" in text and "'maybe'" in text
    assert "1/true/yes/on to turn it on" in text and "unset it" in text
    assert isinstance(info.value, ProfileError) and info.value.key_path == "HYBRID_VAE_STRICT"
    from hybrid_vae.extension.orchestrator import _strict_from_env

    monkeypatch.setenv("HYBRID_VAE_STRICT", "maybe")
    with pytest.raises(EnvError, match="HYBRID_VAE_STRICT"):
        _strict_from_env()  # a typo is said, never read as "off"


def test_a_serve_config_that_is_not_json_names_the_variable(monkeypatch):
    from hybrid_vae.server.cli import app_from_env

    monkeypatch.setenv("HYBRID_VAE_SERVE_CONFIG", "{families: sd15}")
    with pytest.raises(EnvError) as info:
        app_from_env()
    text = str(info.value)
    assert "HYBRID_VAE_SERVE_CONFIG" in text and "not JSON" in text and "'{families: sd15}'" in text
    assert "hybrid-vae serve --workers N" in text and "\n" not in text
