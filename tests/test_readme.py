"""The README's "Try it" commands work as written (run in a scratch copy of the samples)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT


def try_it_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Try it on the bundled samples", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_try_it_commands_run_as_written(tmp_path):
    shutil.copytree(REPO_ROOT / "data" / "samples", tmp_path / "data" / "samples")
    shutil.copytree(REPO_ROOT / "preprocessing", tmp_path / "preprocessing")
    commands = try_it_commands()
    assert len(commands) == 5
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        assert " 0 failed" in result.stdout, f"{command}\n{result.stdout}"
    out = tmp_path / "data" / "try"
    assert sorted(p.name for p in (out / "abc_interleaved").iterdir()) == [
        "bach_bwv67.4.abc", "schumann_robert_opus48no2.abc"]
    assert len(list((out / "abc_interleaved_folk").iterdir())) == 1
    assert sorted(p.name for p in (out / "mtf").iterdir()) == ["edge_multitrack_8.mtf", "m21test_test01.mtf"]
    assert len(list((out / "midi_roundtrip").iterdir())) == 2
    again = subprocess.run([sys.executable, *shlex.split(commands[-2])[1:]], cwd=tmp_path,
                           capture_output=True, text=True, check=False)
    assert "0 converted, 2 skipped" in again.stdout
