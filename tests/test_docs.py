"""The README's commands are tested code: each one parses through the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mmlm.app.cli import main
from mmlm.app.data import data_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """Every ``mmlm …`` line inside the README's bash blocks (comments stripped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("mmlm ")]


def test_every_family_doc_is_linked_from_the_readme():
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in README, page.name


def test_quickstart_is_exactly_two_setup_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)
    assert len(commands) == 2
    assert commands[0].endswith("mmlm quickstart") and "pip install -e" in commands[0]
    test_command = "python -m pytest -q -n 2 --dist loadfile"
    assert commands[1].endswith(test_command) and "pip install -e" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and test_command in ci.splitlines()


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.split()[1] in ("fit", "validate")])
def test_readme_training_commands_parse(command, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # README paths are relative to the repository root
    args = shlex.split(command)[1:]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: mmlm.models." in capsys.readouterr().out


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.split()[1] == "data"])
def test_readme_data_commands_parse(command):
    for part in command.split(" && "):  # one line may chain two tools
        words = shlex.split(part)
        assert words[:2] == ["mmlm", "data"]
        assert data_parser().parse_args(words[2:]).tool == words[2]


def test_readme_names_commands_of_both_kinds():
    kinds = {c.split()[1] for c in readme_commands()}
    assert {"fit", "validate", "data"} <= kinds
