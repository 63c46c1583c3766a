"""Build a random-weight model folder of a published shape in a temporary directory, run one packformer
command on it (@FOLDER@ in its arguments), then delete the folder: the reproduce steps whose model has no
checkpoint here (no model hub) and whose folder must not land in the step's output folder.

    python benchmarks/with_folder.py bge-m3 bench @FOLDER@ --workloads bge_m3 --out OUT
    python benchmarks/with_folder.py qwen3-0.6b bench @FOLDER@ --device cuda --workloads texts_20000 ...
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
BUILDERS = {"bge-m3": "bge_m3_folder", "qwen3-0.6b": "decoder_folder", "mpnet-base-v2": "mpnet_folder"}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in BUILDERS:
        print(__doc__, file=sys.stderr)
        print(f"first argument: one of {', '.join(BUILDERS)}", file=sys.stderr)
        return 2
    build = __import__(BUILDERS[argv[0]]).build
    with tempfile.TemporaryDirectory(prefix="packformer-folder-") as tmp:
        folder = build(Path(tmp) / argv[0])
        args = [a.replace("@FOLDER@", str(folder)) for a in argv[1:]]
        return subprocess.call([sys.executable, "-m", "packformer", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
