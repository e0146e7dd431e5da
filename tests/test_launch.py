"""The launch scripts parse, and every `jaxmm` subcommand and flag the launch guide uses exists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("script", ["launch/tpu_pod.sh", "launch/slurm.sbatch"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_commands_in_the_guide_exist():
    text = (ROOT / "launch" / "README.md").read_text()
    cmds = {c.replace("…", "").strip() for c in re.findall(r'["`](jaxmm [^"`]*)["`]', text)}
    checked = 0
    for cmd in sorted(cmds):
        argv = shlex.split(cmd)[1:]
        if not argv or argv[0].startswith("-"):
            continue
        help_ = subprocess.run([sys.executable, "-m", "jaxmm.cli", argv[0], "--help"], capture_output=True,
                               text=True, cwd=ROOT)
        assert help_.returncode == 0, (cmd, help_.stderr[-300:])
        for flag in (a for a in argv[1:] if a.startswith("--")):
            assert flag in help_.stdout, (cmd, flag)
        checked += 1
    assert checked >= 1
