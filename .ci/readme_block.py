"""Run a bash block of the README as written (each line a `python ...` command), for CI.

    python .ci/readme_block.py "## Raw-file tools, search and classification" [--demo_root data/demo-quick]

Every command must exit 0. The raw-file tools fall back on the embedded default's models, which CI
builds with `make demo-quick` (data/demo-quick/) rather than `make demo` (data/demo/): with
--demo_root, the README's data/demo/ paths are read from that folder instead, and nothing else changes.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def block_commands(heading: str) -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    if heading not in readme:
        raise SystemExit(f"README.md has no section {heading!r}")
    block = re.search(r"```bash\n(.*?)```", readme.split(heading, 1)[1], re.S)
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("heading", help="the README heading the block follows")
    parser.add_argument("--demo_root", help="read data/demo/ paths from this folder instead")
    args = parser.parse_args()
    for command in block_commands(args.heading):
        if args.demo_root:
            command = command.replace("data/demo/", args.demo_root.rstrip("/") + "/")
        argv = shlex.split(command)
        if argv[0] != "python":
            raise SystemExit(f"not a python command: {command}")
        print(f"$ {command}", flush=True)
        done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO_ROOT, check=False)
        if done.returncode != 0:
            print(f"FAILED (exit {done.returncode}): {command}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
