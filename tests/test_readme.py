"""README's command-line reference lists every flag of every command, and no flag that is not."""

import re

from conftest import ROOT
from kerasft import cli
from kerasft.benchmarks.latency import build_parser as bench_parser

FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def reference_block() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```text", readme.index("## Command line"))
    return readme[start : readme.index("```", start + 7)]


def parser_flags() -> dict[str, set[str]]:
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    flags = {"kerasft": {s for a in parser._actions for s in a.option_strings}}
    for name, sub in commands.items():
        flags[name] = {s for a in sub._actions for s in a.option_strings}
    flags["bench"] = {s for a in bench_parser("kerasft bench")._actions for s in a.option_strings}
    return {k: {f for f in v if f.startswith("--") and f != "--help"} for k, v in flags.items()}


def test_every_flag_is_in_the_readme_reference():
    documented = set(FLAG.findall(reference_block()))
    missing = {name: sorted(f - documented) for name, f in parser_flags().items()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_the_readme_reference_names_only_real_flags():
    real = set().union(*parser_flags().values())
    assert sorted(set(FLAG.findall(reference_block())) - real) == []
    assert len(real) > 60  # the parsers were read
