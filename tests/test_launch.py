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


def test_the_tpu_script_installs_tpu_jax_at_the_pinned_version():
    pin = re.search(r'"jax==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    script = (ROOT / "launch" / "tpu_pod.sh").read_text()
    line = next(l for l in script.splitlines() if l.startswith("jax_version="))
    line = line.replace('$(dirname "$0")', shlex.quote(str(ROOT / "launch")))
    got = subprocess.run(
        ["bash", "-c", line + '; echo "$jax_version"'], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert got == pin and "'jax[tpu]==$jax_version'" in script


def test_commands_in_the_guide_exist():
    text = (ROOT / "launch" / "README.md").read_text()
    cmds = {c.replace("…", "").strip() for c in re.findall(r'["`](jaxmm [^"`]*)["`]', text)}
    checked = 0
    for cmd in sorted(cmds):
        argv = shlex.split(cmd)[1:]
        if not argv or argv[0].startswith("-"):
            continue
        help_ = subprocess.run([sys.executable, "-m", "jaxmm.cli", argv[0], "--help"], capture_output=True, text=True, cwd=ROOT)
        assert help_.returncode == 0, (cmd, help_.stderr[-300:])
        for flag in (a for a in argv[1:] if a.startswith("--")):
            assert flag in help_.stdout, (cmd, flag)
        checked += 1
    assert checked >= 1


def test_guide_paths_modules_and_helpers_exist():
    """Config files, `python -m` modules (with their argument count) and `jaxmm.sharding` helpers the
    launch guide names are real."""
    import importlib
    import inspect

    text = (ROOT / "launch" / "README.md").read_text()
    paths = set(re.findall(r"configs/[\w/]+\.yaml", text))
    exists = lambda p: (ROOT / p).exists() or (ROOT / "jaxmm" / p).exists()  # repo or packaged configs
    assert paths and all(map(exists, paths)), sorted(p for p in paths if not exists(p))
    checks = re.findall(r"python -m jaxmm\.launch_check ([^\"`\n]*)", text)
    assert checks
    for args in checks:
        argv = shlex.split(args)
        assert len(argv) == 3 and all(a.isdigit() or a.isupper() for a in argv[1:]), args  # CKPT FSDP TENSOR
    from jaxmm import launch_check

    assert "ckpt, fsdp, tensor" in inspect.getsource(launch_check.main)
    sharding = importlib.import_module("jaxmm.sharding")
    names = set(re.findall(r"jaxmm\.sharding\.(\w+)", text)) | {
        n.strip() for imp in re.findall(r"from jaxmm\.sharding import ([\w, ]+)", text) for n in imp.split(",")
    }
    names |= set(re.findall(r"`(jit_\w+|host_\w+|batch_shardings|cache_shardings)", text))
    assert {"host_slice", "local_rows", "global_batch", "is_writer"} <= names
    assert all(hasattr(sharding, n) for n in names), sorted(n for n in names if not hasattr(sharding, n))
    generate = importlib.import_module("jaxmm.generate")
    gen_names = set(re.findall(r"jaxmm\.generate\.(\w+)", text))
    assert {"jit_prefill", "jit_generate"} <= gen_names
    assert all(hasattr(generate, n) for n in gen_names), sorted(n for n in gen_names if not hasattr(generate, n))
