"""What ``scripts/setup_env.sh`` still has to do, so that re-running it on an unchanged
tree installs and builds nothing. Standard library only; run it with the venv's Python.

  python scripts/setup_state.py requirements [--cuda-torch] REQ...
      exit 0 when every requirement (pip syntax) is installed at a matching version,
      else print the first one that is not and exit 1. ``--cuda-torch``: the installed
      torch must not be a CPU build (a ``+cpu`` version).
  python scripts/setup_state.py build [--root DIR]
      exit 0 when the extension must be (re)built, printing why; 1 when it is up to date.
  python scripts/setup_state.py stamp [--root DIR]
      record the build just made (after it built and loaded).
  python scripts/setup_state.py editable [--root DIR]
      exit 0 when ``import cacheblend_ext`` resolves to DIR's package from any directory
      (an editable install of this tree), else 1.

The build is up to date when the compiled library exists, is the file the last recorded
build wrote, and nothing that goes into it changed since: the files under csrc/ (sources,
headers, csrc/build_config.json), setup.py, the torch release, the Python version, the nvcc
found, and the build knobs: every environment variable setup.py reads
(CACHEBLEND_BUILD_CUDA, CACHEBLEND_ATTENTION_VARIANTS, TORCH_CUDA_ARCH_LIST, CUDA_HOME, ...). The record lives in build/cacheblend-build.json, so ``rm -rf build`` forces a
full rebuild.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAMP = pathlib.Path("build", "cacheblend-build.json")


def build_knobs(root: pathlib.Path) -> list[str]:
    """The environment variables setup.py reads (``os.environ.get("X")``, ``os.environ["X"]``,
    ``os.environ.setdefault("X", ...)``), so that a knob added there counts here too."""
    text = (root / "setup.py").read_text()
    return sorted(set(re.findall(r"os\.environ(?:\.get|\.setdefault)?[(\[]\s*[\"']([A-Z][A-Z0-9_]*)[\"']", text)))


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare venv: pip vendors the same library
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def unmet_requirement(specs: list[str], cuda_torch: bool = False) -> str | None:
    """The first of ``specs`` this environment does not satisfy, with the reason; None if all are."""
    Requirement = _requirement_class()
    for spec in specs:
        req = Requirement(spec)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            return f"{spec}: not installed"
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            return f"{spec}: {version} installed"
        if cuda_torch and req.name.lower() == "torch" and version.endswith("+cpu"):
            return f"{spec}: the CPU build {version} is installed, the CUDA build is wanted"
    return None


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(os.path.join(home, "bin", "nvcc"))
    found = shutil.which("nvcc")
    return os.path.realpath(found) if found else None


def build_inputs(root: pathlib.Path) -> dict:
    """Everything the compiled library depends on, as a dict of strings (hashes for files)."""
    digest = hashlib.sha256()
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    for path in files + [root / "setup.py"]:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {
        "sources": digest.hexdigest(),
        "torch": torch_version,
        "python": sys.implementation.cache_tag,
        "nvcc": _nvcc(),
        **{knob: os.environ.get(knob) for knob in build_knobs(root)},
    }


def _library(root: pathlib.Path) -> pathlib.Path | None:
    found = sorted(glob.glob(str(root / "cacheblend_ext" / "_C*.so")) + glob.glob(str(root / "cacheblend_ext" / "_C*.pyd")))
    return pathlib.Path(found[0]) if found else None


def _file_id(path: pathlib.Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def build_reason(root: pathlib.Path) -> str | None:
    """Why the extension must be rebuilt, or None when it is up to date."""
    lib = _library(root)
    if lib is None:
        return "not built yet"
    stamp = root / STAMP
    if not stamp.exists():
        return f"no record of the build that made {lib.name}"
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return f"unreadable {STAMP}"
    if recorded.get("library") != [lib.name, *_file_id(lib)]:
        return f"{lib.name} was replaced since the recorded build"
    now = build_inputs(root)
    changed = [key for key in now if recorded.get("inputs", {}).get(key) != now[key]]
    if changed:
        names = {"sources": "csrc/ or setup.py", "torch": "the torch release", "python": "the Python version"}
        return "changed since the last build: " + ", ".join(names.get(key, key) for key in changed)
    return None


def write_stamp(root: pathlib.Path) -> None:
    lib = _library(root)
    if lib is None:
        sys.exit("setup_state.py stamp: no compiled library under cacheblend_ext/")
    stamp = root / STAMP
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"library": [lib.name, *_file_id(lib)], "inputs": build_inputs(root)}, indent=1))


def editable_install_of(root: pathlib.Path) -> bool:
    """``import cacheblend_ext`` from another directory finds ``root``'s package."""
    code = ("import importlib.util, sys; s = importlib.util.find_spec('cacheblend_ext'); "
            "print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')")
    # -I: no current directory on sys.path and no PYTHONPATH, only the installed packages.
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=os.path.abspath(os.sep), capture_output=True,
                         text=True)
    found = out.stdout.strip()
    return bool(found) and pathlib.Path(found).resolve() == (root / "cacheblend_ext").resolve()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    req = sub.add_parser("requirements")
    req.add_argument("--cuda-torch", action="store_true")
    req.add_argument("specs", nargs="+")
    for name in ("build", "stamp", "editable"):
        sub.add_parser(name).add_argument("--root", type=pathlib.Path, default=ROOT)
    args = parser.parse_args(argv)
    if args.command == "requirements":
        unmet = unmet_requirement(args.specs, args.cuda_torch)
        if unmet:
            print(unmet)
        return 1 if unmet else 0
    root = args.root.resolve()
    if args.command == "build":
        reason = build_reason(root)
        if reason:
            print(reason)
        return 0 if reason else 1
    if args.command == "stamp":
        write_stamp(root)
        return 0
    return 0 if editable_install_of(root) else 1


if __name__ == "__main__":
    sys.exit(main())
