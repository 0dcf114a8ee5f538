"""What runs: local executors, the remote client, the orchestrator, UI adapters and the CLI.

Importing this package imports nothing heavy; modules import torch/diffusers where they need them.
"""
