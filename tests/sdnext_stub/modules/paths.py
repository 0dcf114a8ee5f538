"""SD.Next's folders: ``data_path`` (config.json, secrets.json, extensions' data). Env SD_STUB_DATA_DIR sets it."""

import os
import tempfile

data_path = os.environ.get("SD_STUB_DATA_DIR") or tempfile.mkdtemp(prefix="sdnext-stub-data-")
script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
extensions_dir = os.path.join(data_path, "extensions")
