"""hybrid-vae: the repository root is the package ``hybrid_vae``.

Its sub-packages are the folders at the top of the repository: ``hybrid_vae.policy`` (the decision engine,
pure Python), ``hybrid_vae.extension`` (executors, remote client, orchestrator, SD.Next/ComfyUI glue, CLI),
``hybrid_vae.server`` (the self-hosted endpoint), ``hybrid_vae.bench`` and ``hybrid_vae.profiles`` (YAML
data). One import name, so nothing collides with a host's own top-level modules (ComfyUI's ``server``):

- pip (``pip install -e .`` or a wheel): ``package-dir = {"hybrid_vae" = "."}`` in pyproject.toml;
- SD.Next (``extensions/<folder>``) and ComfyUI (``custom_nodes/<link>``): the entry files register this
  folder as ``hybrid_vae`` with :func:`importlib.util.spec_from_file_location` (``scripts/hybrid_vae.py``,
  ``extension/comfyui/__init__.py``); nothing of this repository is put on ``sys.path``.

Importing it imports nothing else.
"""
