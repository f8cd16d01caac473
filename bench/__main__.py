"""Microbenchmarks of the cacheblend ops and of the whole blend.

Each command times cacheblend against the alternatives (eager PyTorch, torch.compile,
SDPA, full prefill, ...) in the same run and prints tables; --json also writes them, with
the machine and the conditions, to a file. The ops' tables compare the bytes an op must
move with a copy timed in the same rounds (the "% of copy BW" column).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pkgutil
import sys
import textwrap

import bench
from bench import common

EXAMPLES = """\
examples:
  python -m bench select                       HKVD selection at the default shape
  python -m bench rope --device cpu --iters 5  fewer timed calls
  python -m bench e2e --ratios 15 --json e2e.json
  python -m bench attention --help             a command's options and their defaults

Modules of this package that define COMMAND, HELP, add_arguments(parser) and
run(args) -> dict are the commands. Results measured so far: bench/results/.
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, also for options without a help text, except where it
    says nothing (None, a flag's False) or the help text already states it."""

    @staticmethod
    def _shows_default(action) -> bool:
        default = action.default
        return bool(action.option_strings) and not (default is None or default is False or default == ""
                                                    or default is argparse.SUPPRESS)

    def _format_action(self, action):
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if not self._shows_default(action) or "(default" in text or "%(default" in text:
            return text
        return f"{text} (default: %(default)s)"


def command_modules() -> dict:
    """``{command: module}`` of every module of this package that defines ``COMMAND``."""
    found = {}
    for info in pkgutil.iter_modules(bench.__path__):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if hasattr(module, "COMMAND"):
            found[module.COMMAND] = module
    return dict(sorted(found.items()))


def _command_list(commands) -> str:
    width = max(map(len, commands)) + 2
    lines = ["commands (`python -m bench <command> --help` lists a command's options and defaults):"]
    for name, module in commands.items():
        text = textwrap.wrap(module.HELP, 88 - 2 - width)
        lines += [f"  {name:<{width}}{text[0]}"] + [" " * (2 + width) + rest for rest in text[1:]]
    return "\n".join(lines)


def build_parser(commands=None) -> argparse.ArgumentParser:
    commands = command_modules() if commands is None else commands
    parser = argparse.ArgumentParser(prog="python -m bench", usage="%(prog)s [-h] <command> [options]",
                                     description=f"{__doc__}\n{_command_list(commands)}", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>", help=argparse.SUPPRESS)
    for name, module in commands.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        common.add_common_arguments(p)
        module.add_arguments(p)
    return parser


def main(argv=None) -> int:
    commands = command_modules()
    args = build_parser(commands).parse_args(argv)
    common.quiet_cuda_home_warning()
    result = commands[args.command].run(args)
    common.write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
