"""Every command's ``-h``, walked from the Typer app itself (a new command is checked without
being listed here): readable value names, usage lines as git's, every option explained, the
defaults shown, and examples that parse as real commands."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperArgument, TyperOption

from clipinvert.cli import app, main

GROUP = typer.main.get_command(app)


def _walk(command, path: tuple[str, ...] = ()):
    """(path, click command) of every group and command under ``command``."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(GROUP))
IDS = [" ".join(p) or "clipinvert" for p, _ in COMMANDS]


def test_the_walk_finds_every_command() -> None:
    names = set(IDS)
    assert {"align", "invert", "edit", "interpolate", "train", "eval metrics",
            "eval benchmark", "eval compare", "eval train-classifier", "models list",
            "models download", "models verify", "models path"} <= names


def _help(path: tuple[str, ...], capsys) -> str:
    assert main([*path, "-h"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _options(command) -> list[TyperOption]:
    return [p for p in command.params if isinstance(p, TyperOption) and not p.hidden
            and p.name != "help"]


def _default_shown(param: TyperOption) -> str | None:
    """The ``[default: …]`` the help must show for ``param`` (None: none)."""
    if param.default is None or param.show_default is False:
        return None
    if param.is_flag and param.secondary_opts:
        names = param.opts if param.default else param.secondary_opts
        return [n for n in names if n.startswith("--")][0].removeprefix("--")
    if param.is_flag:
        return None  # a plain flag is off unless given
    return str(param.default)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help_reads_well(path: tuple[str, ...], command, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    text = _help(path, capsys)
    flat = " ".join(text.split())  # wrapping may split "[default: x]" over lines
    # No Python type names, no <bool> beside flags.
    assert not re.search(r"<(bool|str|int|float|path|list\[[^>]*\]|[A-Za-z]+\])>", text), text
    for bad in ("<bool>", "list[", "Path]", "NoneType"):
        assert bad not in text, (bad, text)
    # Usage as git writes it: arguments in capitals, optional ones in brackets (no {INPUT}).
    usage = text.splitlines()[0]
    assert "{" not in usage
    words = ["Usage:", "clipinvert", *path, "[OPTIONS]"]
    for param in command.params:
        if isinstance(param, TyperArgument):
            label = (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")
            words.append(label if param.required else f"[{label}]")
    if isinstance(command, typer.core.TyperGroup):
        words += ["COMMAND", "[ARGS]..."]
    assert usage.split() == words
    # Every option says what it is for, and shows its default.
    for param in _options(command):
        assert param.help and param.help.strip(), (path, param.name)
        assert param.opts[-1] in text or param.opts[0] in text, (path, param.name)
        shown = _default_shown(param)
        if shown is not None:
            assert f"[default: {shown}]" in flat, (path, param.name, flat)
    # It ends with examples: whole lines, each a command of this very path.
    assert "\nExamples:\n" in text
    lines = [ln.strip() for ln in text.split("\nExamples:\n", 1)[1].splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3
    for line in lines:
        assert line.startswith(" ".join(["clipinvert", *path])), line


def _parse(argv: list[str]) -> None:
    """Parse an example's command line as click would, without running it: an option or
    subcommand that does not exist, a missing value or an extra argument raises."""
    assert argv[0] == "clipinvert"
    command, args = GROUP, argv[1:]
    while isinstance(command, typer.core.TyperGroup) and args and args[0] in command.commands:
        command, args = command.commands[args[0]], args[1:]
    if isinstance(command, typer.core.TyperGroup):
        assert args in ([], ["-h"]), argv
        return
    ctx = typer._click.Context(command, info_name=command.name,
                               help_option_names=["-h", "--help"])
    values, rest, _ = command.make_parser(ctx).parse_args(list(args))
    assert rest == [], (argv, rest)
    for param in command.params:  # required arguments and options are there
        if param.required and values.get(param.name) is None and "-h" not in argv:
            pytest.fail(f"{argv}: {param.name} missing")


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_examples_are_real_commands(path: tuple[str, ...], command) -> None:
    for line in (command.epilog or "").splitlines():
        _parse(shlex.split(line))


def test_the_hidden_old_spelling_still_works(capsys) -> None:
    """--latents/--no-latents (invert's old names) parse, but -h shows --save-latents only."""
    invert = GROUP.commands["invert"]
    ctx = typer._click.Context(invert, info_name="invert")
    for flag, value in (("--no-latents", False), ("--latents", True),
                        ("--no-save-latents", False)):
        values, _, _ = invert.make_parser(ctx).parse_args(["x.png", flag])
        assert values["save_latents"] is value
    text = _help(("invert",), capsys)
    assert "--save-latents / --no-save-latents" in text and "--latents" not in text


def test_shared_options_say_what_they_do_in_each_command(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    helps = {name: " ".join(_help(tuple(name.split()), capsys).split())
             for name in ("align", "edit", "train", "eval metrics", "eval train-classifier")}
    assert "--batch-size N|auto" in helps["edit"] and "auto" in helps["edit"]
    for name in ("train", "eval metrics", "eval train-classifier"):
        assert "--batch-size N " in helps[name] and "or auto (on the CPU 4" not in helps[name]
    assert "Processes aligning images" in helps["align"]
    assert "Write a crop of every face" in helps["align"]
    assert "Data-loading processes" in helps["train"]
    assert "inference draws no random numbers" in helps["edit"]
    assert "Seed of the initial weights" in helps["train"]
    assert "--no-save-latents" in helps["edit"]


@pytest.mark.parametrize("args", [[], ["models"], ["eval"]])
def test_no_command_prints_the_help(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "clipinvert.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(
                              Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: clipinvert") and "Commands:" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"FORCE_COLOR": "1", "TERM": "xterm"}])
def test_help_is_plain_text_on_any_terminal(env: dict[str, str]) -> None:
    """No rich markup: the brackets in "[default: out]" and "cuda[:N]" survive whether or
    not colour is asked for."""
    proc = subprocess.run([sys.executable, "-m", "clipinvert.cli", "edit", "-h"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "100", **env, "PYTHONPATH": str(
                              Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0
    assert "[default: out]" in proc.stdout and "cuda[:N]" in proc.stdout
    assert "\x1b[" not in proc.stdout
    assert proc.stdout.startswith("Usage: clipinvert edit [OPTIONS] INPUT [PROMPT]\n")
