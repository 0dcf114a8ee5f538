"""One settings model: SD.Next's options map onto ``DecodeSettings`` through one table, and every front end's bad
value is one line naming its own name for it, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from hybrid_vae.extension.sdnext_ui import NOT_EXPOSED, OPTIONS, Config, options_markdown, read_config
from hybrid_vae.policy.errors import SettingsError
from hybrid_vae.policy.model import DecodeSettings, MiB, build_settings, field_choices, field_expectation

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("sd15", "sdxl", "sd3", "flux", "hunyuanvideo", "wan")
START, END = "<!-- sdnext-table:start -->", "<!-- sdnext-table:end -->"
#: A valid value that is not the default, per option (in the option's unit), and the field value it must give.
CHANGED = {
    "hybrid_vae_mode": ("TILED ", "tiled"),
    "hybrid_vae_allow_remote": (True, True),
    "hybrid_vae_remote_custom_vae": ("true", True),
    "hybrid_vae_endpoints": ("sdxl=https://a.example/x", {"sdxl": "https://a.example/x"}),
    "hybrid_vae_builtin_endpoints": (True, True),
    "hybrid_vae_reserve_mib": (1024, 1024 * MiB),
    "hybrid_vae_tile_groupnorm": ("offload", "offload"),
    "hybrid_vae_tile_overlap_px": ("32", 32),
    "hybrid_vae_remote_deadline_s": (12.5, 12.5),
}


def read(values: dict) -> Config:
    return read_config(lambda k, d: values.get(k, d), families=FAMILIES)


def test_the_option_table_covers_every_field_sdnext_exposes():
    """Each row sets one DecodeSettings field or one SD.Next-only attribute; every field of the model is either an
    option or listed, with the reason, as not exposed (a new field must be placed here or fails)."""
    fields = [o.field for o in OPTIONS if o.field]
    assert all((o.field is None) != (o.attr is None) for o in OPTIONS)
    assert len(fields) == len(set(fields)) and set(fields) <= set(DecodeSettings.model_fields)
    assert set(fields) | set(NOT_EXPOSED) == set(DecodeSettings.model_fields)
    assert not set(fields) & set(NOT_EXPOSED)
    assert {o.attr for o in OPTIONS if o.attr} == {"enabled", "token", "profile_path", "decision_log", "learn"}
    assert all(o.key.startswith("hybrid_vae_") for o in OPTIONS) and set(CHANGED) == {o.key for o in OPTIONS if o.field}


def test_option_defaults_are_the_engines_except_the_builtin_endpoints():
    """SD.Next's defaults are the engine's, but for the built-in endpoints: off in SD.Next until switched on."""
    engine, sdnext = DecodeSettings(), Config().settings
    differ = {f for f in DecodeSettings.model_fields if getattr(engine, f) != getattr(sdnext, f)}
    assert differ == {"use_builtin_endpoints"} and sdnext.use_builtin_endpoints is False


@pytest.mark.parametrize("key", sorted(CHANGED))
def test_an_option_sets_its_field_with_the_unit_converted(key):
    spec = next(o for o in OPTIONS if o.key == key)
    raw, want = CHANGED[key]
    cfg = read({key: raw})
    assert cfg.problems == () and getattr(cfg.settings, spec.field) == want
    others = {f for f in DecodeSettings.model_fields if getattr(cfg.settings, f) != getattr(Config().settings, f)}
    assert others == {spec.field}


@pytest.mark.parametrize(("key", "raw", "text"), [
    ("hybrid_vae_mode", "fastest", "hybrid_vae_mode='fastest' is not one of auto, full, tiled, remote; using auto"),
    ("hybrid_vae_reserve_mib", 70000, "hybrid_vae_reserve_mib=70000 is not a number in [0, 65536]; using 128"),
    ("hybrid_vae_reserve_mib", "lots", "hybrid_vae_reserve_mib='lots' is not a number in [0, 65536]; using 128"),
    ("hybrid_vae_tile_overlap_px", -8, "hybrid_vae_tile_overlap_px=-8 is not a number in [0, 512]; using 64"),
    ("hybrid_vae_tile_overlap_px", float("nan"), "hybrid_vae_tile_overlap_px=nan is not a number in [0, 512]"),
    ("hybrid_vae_remote_deadline_s", 0, "hybrid_vae_remote_deadline_s=0 is not a number in (0, 3600]; using 60"),
    ("hybrid_vae_tile_groupnorm", "best", "hybrid_vae_tile_groupnorm='best' is not one of auto, exact, offload, local"),
    ("hybrid_vae_allow_remote", 1, "hybrid_vae_allow_remote=1 is not true/false; using False"),
    ("hybrid_vae_decision_log", "yes", "hybrid_vae_decision_log='yes' is not true/false; using True"),
])
def test_a_bad_option_names_key_value_and_the_default_used(key, raw, text):
    cfg = read({key: raw})
    assert len(cfg.problems) == 1 and text in cfg.problems[0] and "\n" not in cfg.problems[0]
    assert cfg.settings == Config().settings and cfg.decision_log is True


def test_docs_list_the_option_table():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert START in text and END in text
    assert text.split(START, 1)[1].split(END, 1)[0].strip() == options_markdown().strip(), \
        "docs/configuration.md is stale: paste extension.sdnext_ui.options_markdown()"


def test_choices_and_limits_come_from_the_model():
    assert field_choices("mode") == ("auto", "full", "tiled", "remote")
    assert field_choices("tile_groupnorm") == ("auto", "exact", "offload", "local")
    assert field_expectation("reserve_bytes", MiB) == "a number in [0, 65536]"
    assert field_expectation("host_reserve_bytes") == "a number in [0, 1099511627776]"
    with pytest.raises(KeyError):
        field_choices("reserve_bytes")


@pytest.mark.parametrize(("values", "names", "scales", "text"), [
    ({"reserve_bytes": 100}, {"reserve_bytes": "--reserve-gib"}, {"reserve_bytes": 2**30},
     "--reserve-gib 100: give a number in [0, 64]"),
    ({"mode": "fast"}, {"mode": "mode"}, None, "mode='fast': give one of auto, full, tiled, remote"),
    ({"tile_groupnorm": "x"}, None, None, "tile_groupnorm='x': give one of auto, exact, offload, local"),
    ({"endpoints": {"sdxl": "ftp://a"}}, {"endpoints": "--endpoint"}, None,
     "--endpoint {'sdxl': 'ftp://a'}: endpoint for 'sdxl' must start with http:// or https://"),
])
def test_build_settings_names_the_front_ends_name(values, names, scales, text):
    with pytest.raises(SettingsError) as info:
        build_settings(values, names=names, scales=scales)
    assert str(info.value).startswith(text) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_build_settings_scales_into_the_fields_unit():
    s = build_settings({"reserve_bytes": 0.5, "remote_deadline_s": 2}, scales={"reserve_bytes": 2**30})
    assert s.reserve_bytes == 2**29 and isinstance(s.reserve_bytes, int) and s.remote_deadline_s == 2.0
    assert build_settings({"mode": "tiled"}, base=s).reserve_bytes == 2**29


def test_updated_checks_what_model_copy_would_not():
    s = DecodeSettings()
    assert s.updated(mode="tiled").mode == "tiled" and s.mode == "auto"
    with pytest.raises(ValueError, match="must start with http"):
        s.updated(endpoints={"sd15": "ftp://x"})


@pytest.mark.parametrize(("kwargs", "text"), [
    ({"mode": "fast"}, "mode='fast': give one of auto, full, tiled, remote"),
    ({"tiling": "best"}, "tiling='best': give one of auto, exact, offload, local"),
    ({"endpoint": "ftp://x/sd15"}, "endpoint={'sd15': 'ftp://x/sd15'}: endpoint for 'sd15' must start with http"),
])
def test_comfyui_widgets_build_the_model_and_name_the_widget(kwargs, text):
    """The node lists the model's choices and a refused value names the widget (before any decode runs)."""
    import torch
    from hybrid_vae.extension.comfyui.nodes import MODES, TILINGS, HybridVAEDecode

    assert MODES == field_choices("mode") and TILINGS == field_choices("tile_groupnorm")
    spec = HybridVAEDecode.INPUT_TYPES()["optional"]
    assert list(spec["mode"][0]) == list(MODES) and list(spec["tiling"][0]) == list(TILINGS)
    with pytest.raises(SettingsError) as info:
        HybridVAEDecode().decode({"samples": torch.zeros(1, 4, 8, 8)}, object(), family="sd15", **kwargs)
    assert str(info.value).startswith(text) and "\n" not in str(info.value)


@pytest.mark.parametrize(("value", "text"), [
    ("-1", "--reserve-gib -1: give a number in [0, 64]"), ("100", "--reserve-gib 100: give a number in [0, 64]"),
    ("nan", "--reserve-gib nan: give a number in [0, 64]"), ("1e300", "--reserve-gib 1e+300: give a number in [0, 64]"),
])
def test_explain_flags_build_the_model_and_name_the_flag(capsys, value, text):
    """``--reserve-gib`` is checked by the model's limits in GiB (no hand-written range): one line, exit 2."""
    from hybrid_vae.extension.cli import main

    code = main(["explain", "--family", "sdxl", "--width", "512", "--height", "512", "--gpu", "NVIDIA GeForce RTX 3070",
                 "--free-gib", "1", f"--reserve-gib={value}"])
    err = capsys.readouterr().err
    assert code == 2 and text in err and err.count("\n") == 1
