"""The supported transformers range is stated in four places (setup.py's extras,
scripts/setup_env.sh, the docstring of make_dynamic_cache that relies on DynamicCache
internals, the README); they agree, and the installed transformers lies in it."""

from __future__ import annotations

import pathlib
import re

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import cacheblend_ext.blend.hf as hf

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = r"transformers\s*(>=[0-9.]+,<[0-9.]+)"


def ranges(text: str) -> set:
    return set(re.findall(SPEC, text))


def test_every_statement_of_the_transformers_range_agrees():
    found = {
        "setup.py": ranges((ROOT / "setup.py").read_text()),
        "scripts/setup_env.sh": ranges((ROOT / "scripts/setup_env.sh").read_text()),
        "make_dynamic_cache": ranges(hf.make_dynamic_cache.__doc__.replace("`", "")),
        "README.md": ranges((ROOT / "README.md").read_text().replace("`", "")),
    }
    assert all(len(r) == 1 for r in found.values()), found
    assert len(set.union(*found.values())) == 1, found


def test_installed_transformers_is_in_the_range():
    (spec,) = ranges((ROOT / "setup.py").read_text())
    assert Version(transformers.__version__) in SpecifierSet(spec), (transformers.__version__, spec)
