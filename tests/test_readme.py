"""The README's commands and paths are real: whatever it says, every repository path
it names exists and every ``blinkflow SUBCOMMAND`` it shows is a real subcommand."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"

#: top-level folders of this repository; a path that starts with one of them must exist
REPO_DIRS = ("configs", "docs", "deploy", "models", "pipeline", "stages", "tests")
_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*{},-]*)" % "|".join(REPO_DIRS))
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")


def readme_text() -> str:
    return README.read_text()


def code_texts(text: str) -> list[str]:
    """Fenced blocks (line by line) and inline code spans."""
    lines = [line for block in _FENCE.findall(text) for line in block.splitlines()]
    return lines + _INLINE.findall(_FENCE.sub("", text))


def is_placeholder(path: str) -> bool:
    """``configs/train/TASK.yaml`` or ``docs/{a,b}.md`` stand for a family of paths, not one file."""
    return "{" in path or any(re.fullmatch(r"[A-Z][A-Z_]+", Path(part).stem) for part in path.split("/"))


def mentioned_paths(text: str) -> set[str]:
    paths = {m.rstrip(".,:;") for m in _PATH.findall(text)}
    for target in _LINK.findall(text):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            paths.add(target.split("#", 1)[0])
    return {p for p in paths if p and not is_placeholder(p)}


def exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return any(REPO_ROOT.glob(path))
    return (REPO_ROOT / path).exists()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def blinkflow_commands(text: str) -> list[list[str]]:
    """Every ``blinkflow ...`` invocation in code, split into words (``$`` prompts and comments removed)."""
    commands = []
    for snippet in code_texts(text):
        for part in re.split(r"&&|\|\||;|\|", snippet.split(" #", 1)[0]):
            words = part.strip().removeprefix("$ ").split()
            if words[:1] == ["blinkflow"] and len(words) > 1:
                try:
                    commands.append(shlex.split(part.strip().removeprefix("$ ")))
                except ValueError:
                    commands.append(words)
    return commands


def first_choices(sub: argparse.ArgumentParser) -> list[str] | None:
    for action in sub._actions:
        if not action.option_strings and action.choices is not None and not isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return None


def test_readme_paths_exist():
    missing = sorted(p for p in mentioned_paths(readme_text()) if not exists(p))
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_readme_blinkflow_subcommands_are_real():
    from blinkflow.cli import build_parser

    commands = subparsers(build_parser())
    shown = blinkflow_commands(readme_text())
    unknown = sorted({" ".join(w[:2]) for w in shown if not w[1].startswith("-") and w[1] not in commands})
    assert not unknown, f"README.md shows unknown subcommands: {unknown}; real ones: {sorted(commands)}"


def test_readme_subcommand_choices_are_real():
    """``blinkflow bench decode`` and ``blinkflow train flow``: the word after the subcommand is one it accepts."""
    from blinkflow.cli import build_parser

    commands = subparsers(build_parser())
    wrong = []
    for words in blinkflow_commands(readme_text()):
        sub = commands.get(words[1])
        choices = first_choices(sub) if sub is not None else None
        arg = words[2] if len(words) > 2 else None
        if choices and arg and re.fullmatch(r"[a-z][\w-]*", arg) and arg not in choices:
            wrong.append(f"blinkflow {words[1]} {arg} (choices: {choices})")
    assert not wrong, f"README.md passes values the parser refuses: {wrong}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("see [`docs/design.md`](docs/design.md#decisions)", {"docs/design.md"}),
        ("`blinkflow train detect --config configs/train/TASK.yaml`", set()),
        ("![x](docs/img/a.png) and https://example.com/docs/x", {"docs/img/a.png"}),
        ("run configs/demo.yaml.", {"configs/demo.yaml"}),
    ],
)
def test_mentioned_paths_parses_links_code_and_placeholders(text, expected):
    assert mentioned_paths(text) == expected


def test_blinkflow_commands_found_in_fences_and_inline_code():
    text = "use `blinkflow list`\n\n```bash\n$ blinkflow run configs/demo.yaml  # go\npip install x && blinkflow demo\n```\n"
    assert sorted(w[:2] for w in blinkflow_commands(text)) == [
        ["blinkflow", "demo"], ["blinkflow", "list"], ["blinkflow", "run"]]
