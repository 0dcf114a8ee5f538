"""Compatibility module: extensions ``import modules.scripts as scripts`` (SD.Next re-exports scripts_manager)."""

from modules import scripts_manager  # noqa: F401
from modules.scripts_manager import *  # noqa: F403
