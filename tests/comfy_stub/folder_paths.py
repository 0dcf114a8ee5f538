"""Stand-in for ComfyUI's ``folder_paths`` (tests only): the output directory is set by the test."""

import os
import tempfile

output_directory = os.environ.get("COMFY_STUB_OUTPUT", os.path.join(tempfile.gettempdir(), "comfy-stub-output"))


def get_output_directory() -> str:
    return output_directory
