"""``python -m bench <command>``: each module in this package that defines ``COMMAND``,
``HELP``, ``add_arguments(parser)`` and ``run(args) -> dict`` is a sub-command."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import bench
from bench import common


def _commands():
    found = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if hasattr(module, "COMMAND"):
            found[module.COMMAND] = module
    return dict(sorted(found.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = _commands()
    for name, module in commands.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        common.add_common_arguments(p)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    result = commands[args.command].run(args)
    common.write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
