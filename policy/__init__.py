"""hybrid-vae's decision engine: pure Python, no torch/diffusers/requests import at import time.

Inputs in, frozen decision out::

    from hybrid_vae.policy import DecodeJob, DecodeSettings, decide, load_profiles, probe
    decision = decide(DecodeJob("sdxl", 1024, 1024), probe(), load_profiles(), DecodeSettings())
    decision.chosen.path      # "full" | "tiled" | "remote" | "cpu"
"""

from hybrid_vae.policy.decide import decide, endpoint_for, identity_gate
from hybrid_vae.policy.env import Env, read_env
from hybrid_vae.policy.errors import (
    ArgumentError,
    CircuitOpenError,
    DecodeFailedError,
    EnvError,
    HybridVAEError,
    LatentError,
    PlanError,
    ProfileError,
    RemoteConnectError,
    RemoteError,
    RemoteProtocolError,
    RemoteSecurityError,
    RemoteStatusError,
    RemoteTimeoutError,
    SettingsError,
)
from hybrid_vae.policy.gpu import ENV_SIMULATE, GiB, GpuState, parse_simulation, probe
from hybrid_vae.policy.model import (
    Decision,
    DecodeJob,
    DecodeSettings,
    EndpointIdentity,
    Estimate,
    NetworkStats,
    Option,
    Plan,
    build_settings,
)
from hybrid_vae.policy.profiles import ENV_PROFILE, Family, Profiles, ProfileStore, load_profiles

__all__ = [
    "ENV_PROFILE",
    "ENV_SIMULATE",
    "ArgumentError",
    "CircuitOpenError",
    "Decision",
    "DecodeFailedError",
    "DecodeJob",
    "DecodeSettings",
    "EndpointIdentity",
    "Env",
    "EnvError",
    "Estimate",
    "Family",
    "GiB",
    "GpuState",
    "HybridVAEError",
    "LatentError",
    "NetworkStats",
    "Option",
    "Plan",
    "PlanError",
    "ProfileError",
    "ProfileStore",
    "Profiles",
    "RemoteConnectError",
    "RemoteError",
    "RemoteProtocolError",
    "RemoteSecurityError",
    "RemoteStatusError",
    "RemoteTimeoutError",
    "SettingsError",
    "build_settings",
    "decide",
    "endpoint_for",
    "identity_gate",
    "load_profiles",
    "parse_simulation",
    "probe",
    "read_env",
]
