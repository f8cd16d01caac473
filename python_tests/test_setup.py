"""scripts/setup_env.sh's decisions: which torch it installs, and when it rebuilds the
extension (scripts/setup_state.py). Nothing is installed or compiled here: the script runs
with --dry-run, the build record on a copy of the sources."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STATE = ROOT / "scripts" / "setup_state.py"


def _state(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STATE), *args], capture_output=True, text=True, env=env, timeout=60)


# ------------------------------------------------------------------ torch flavour choice

def _fake_bin(tmp_path, gpu: bool) -> pathlib.Path:
    """A PATH directory with an nvcc and an nvidia-smi that lists a GPU or fails as it does
    on a machine without a driver."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
    smi = "echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)'" if gpu else "echo 'NVIDIA-SMI has failed' >&2; exit 9"
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    return fake


def _dry_run(tmp_path, path: str, **env) -> subprocess.CompletedProcess:
    full_env = {"PATH": path, "HOME": str(tmp_path), "CACHEBLEND_VENV": str(tmp_path / "no-venv"), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh"), "--dry-run"], capture_output=True,
                          text=True, env=full_env, timeout=60)


def _host_has_gpu() -> bool:
    return any(pathlib.Path("/proc/driver/nvidia/gpus").glob("*"))


def test_auto_takes_the_cuda_build_with_nvcc_and_a_gpu(tmp_path):
    fake = _fake_bin(tmp_path, gpu=True)
    out = _dry_run(tmp_path, f"{fake}:/usr/bin:/bin")
    assert out.returncode == 0, out.stderr
    assert "torch==2.14.1 (cuda build: auto: nvcc and a GPU found)" in out.stdout
    assert "would create the venv" in out.stdout


@pytest.mark.skipif(_host_has_gpu(), reason="this machine has an NVIDIA GPU")
def test_auto_takes_the_cpu_build_with_nvcc_but_no_gpu(tmp_path):
    fake = _fake_bin(tmp_path, gpu=False)
    out = _dry_run(tmp_path, f"{fake}:/usr/bin:/bin")
    assert out.returncode == 0, out.stderr
    assert "torch==2.13.0 (cpu build: auto: nvcc found but no GPU" in out.stdout


@pytest.mark.skipif(_host_has_gpu() or os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="this machine has a GPU or nvcc in /usr/local/cuda")
def test_auto_takes_the_cpu_build_without_nvcc(tmp_path):
    out = _dry_run(tmp_path, "/usr/bin:/bin")
    assert out.returncode == 0, out.stderr
    assert "torch==2.13.0 (cpu build: auto: no nvcc)" in out.stdout


@pytest.mark.parametrize("flavor, spec", [("cpu", "torch==2.13.0"), ("cuda", "torch==2.14.1")])
def test_one_variable_chooses_the_build(tmp_path, flavor, spec):
    fake = _fake_bin(tmp_path, gpu=flavor == "cpu")  # the opposite of what auto would pick
    out = _dry_run(tmp_path, f"{fake}:/usr/bin:/bin", CACHEBLEND_TORCH=flavor)
    assert out.returncode == 0, out.stderr
    assert f"{spec} ({flavor} build: CACHEBLEND_TORCH={flavor})" in out.stdout


def test_a_wrong_flavor_is_refused(tmp_path):
    out = _dry_run(tmp_path, "/usr/bin:/bin", CACHEBLEND_TORCH="gpu")
    assert out.returncode == 2
    assert "CACHEBLEND_TORCH must be auto, cpu or cuda, got 'gpu'" in out.stderr


# ------------------------------------------------------------------ packages

def test_requirements_met_and_unmet():
    assert _state("requirements", "pytest", "torch").returncode == 0
    out = _state("requirements", "pytest", "pytest<1")
    assert out.returncode == 1 and out.stdout.startswith("pytest<1: ") and "installed" in out.stdout
    out = _state("requirements", "cacheblend-no-such-package==1.0")
    assert out.returncode == 1 and "not installed" in out.stdout


def test_requirements_cuda_torch():
    import torch

    out = _state("requirements", "--cuda-torch", "torch")
    cpu_build = torch.__version__.endswith("+cpu")
    assert out.returncode == (1 if cpu_build else 0), out.stdout
    if cpu_build:
        assert "the CPU build" in out.stdout


# ------------------------------------------------------------------ the build record

@pytest.fixture
def tree(tmp_path):
    """A copy of what the extension is built from, with a stand-in compiled library."""
    root = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", root / "csrc")
    shutil.copy(ROOT / "setup.py", root / "setup.py")
    (root / "cacheblend_ext").mkdir()
    (root / "cacheblend_ext" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"built")
    return root


def _build_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CACHEBLEND_BUILD_CUDA", "CACHEBLEND_ATTENTION_VARIANTS", "TORCH_CUDA_ARCH_LIST")}
    env.update(extra)
    return env


def _needs_build(root, **env) -> str | None:
    out = _state("build", "--root", str(root), env=_build_env(**env))
    assert out.returncode in (0, 1), out.stderr
    return out.stdout.strip() if out.returncode == 0 else None


def test_build_record(tree):
    lib = tree / "cacheblend_ext" / "_C.cpython-311-x86_64-linux-gnu.so"
    assert _needs_build(tree).startswith("no record of the build")
    assert _state("stamp", "--root", str(tree), env=_build_env()).returncode == 0
    assert _needs_build(tree) is None

    # Touching a file is no change; editing a header or the build config is.
    os.utime(tree / "csrc" / "checks.h")
    assert _needs_build(tree) is None
    with open(tree / "csrc" / "checks.h", "a") as f:
        f.write("// edited\n")
    assert _needs_build(tree) == "changed since the last build: csrc/ or setup.py"
    _state("stamp", "--root", str(tree), env=_build_env())
    config = tree / "csrc" / "build_config.json"
    config.write_text(config.read_text().replace('"-O3"', '"-O2"', 1))
    assert _needs_build(tree) == "changed since the last build: csrc/ or setup.py"
    _state("stamp", "--root", str(tree), env=_build_env())

    # The build knobs, and another build of the library (say by hand, for another torch).
    assert _needs_build(tree, CACHEBLEND_BUILD_CUDA="1") == "changed since the last build: CACHEBLEND_BUILD_CUDA"
    assert "TORCH_CUDA_ARCH_LIST" in _needs_build(tree, TORCH_CUDA_ARCH_LIST="9.0")
    assert "CACHEBLEND_ATTENTION_VARIANTS" in _needs_build(tree, CACHEBLEND_ATTENTION_VARIANTS="1")
    # A knob that setup.py starts to read counts from then on.
    setup = tree / "setup.py"
    setup.write_text(setup.read_text() + '\nos.environ.get("CACHEBLEND_NEW_KNOB")\n')
    _state("stamp", "--root", str(tree), env=_build_env())
    assert _needs_build(tree, CACHEBLEND_NEW_KNOB="1") == "changed since the last build: CACHEBLEND_NEW_KNOB"
    lib.write_bytes(b"built again, elsewhere")
    assert _needs_build(tree) == f"{lib.name} was replaced since the recorded build"
    lib.unlink()
    assert _needs_build(tree) == "not built yet"


def test_a_copy_of_the_tree_is_not_the_editable_install(tree):
    assert _state("editable", "--root", str(tree)).returncode == 1
