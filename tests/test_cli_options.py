"""Options declared once: shared options reach every command, the report's params are what the
command received, and the command line starts without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from PIL import Image

from clipinvert.cli import MODEL_OPTIONS, RUN_OPTIONS, Common, app, main, shared


def _imports_torch(stderr: str) -> list[str]:
    """Modules named torch or torch.* in ``python -X importtime`` output."""
    names = (line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines()
             if line.startswith("import time:"))
    return [n for n in names if n == "torch" or n.startswith("torch.")]


@pytest.mark.parametrize("args", [
    ["-c", "import clipinvert.errors, sys; assert 'torch' not in sys.modules"],
    ["-c", "import clipinvert, clipinvert.cli, sys; assert 'torch' not in sys.modules"],
    ["-m", "clipinvert.cli", "--help"],
    ["-m", "clipinvert.cli", "edit", "-h"],
])
def test_no_torch_for_errors_or_help(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _imports_torch(proc.stderr) == []


def test_every_command_shows_every_option_with_its_default(monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    group = typer.main.get_command(app)
    for name in ("align", "invert", "edit", "interpolate"):
        assert main([name, "-h"]) == 0
        text = " ".join(capsys.readouterr().out.split())  # help wraps at 80 columns
        for param in group.commands[name].params:
            if isinstance(param, typer.core.TyperArgument):
                continue
            long = next(o for o in param.opts if o.startswith("--"))  # later ones: aliases
            assert long in text, (name, param.name)
            if param.default not in (None, False) and param.show_default is not False:
                shown = param.default.name if isinstance(param.default, Path) else param.default
                flag = param.name.replace("_", "-")
                assert f"[default: {shown}]" in text or f"[default: {flag}]" in text, \
                    (name, param.name)


def test_report_params_are_what_the_command_received(tiny_models: Path, tmp_path: Path,
                                                     face_crop: Image.Image) -> None:
    img = tmp_path / "x.png"
    face_crop.resize((32, 32)).save(img)
    out = tmp_path / "out"
    assert main(["invert", str(img), "-o", str(out), "--models", str(tiny_models), "--domain",
                 "tiny", "--device", "cpu", "--workers", "0", "-q", "-b", "2"]) == 0
    params = json.loads((out / "clipinvert-report.json").read_text())["params"]
    command = typer.main.get_command(app).commands["invert"]
    assert list(params) == [p.name for p in command.params if p.name != "help"]
    assert params["input"] == str(img) and params["output"] == str(out)
    assert params["models"] == str(tiny_models) and params["batch_size"] == 2
    assert params["workers"] == 0 and params["ext"] == "png" and params["png_level"] == 1
    assert params["save_latents"] is True and params["trust_checkpoint"] is False
    assert params["report"] is None and params["seed"] == 0


def test_a_new_command_declares_only_its_own_options() -> None:
    seen: list[Common] = []
    demo = typer.Typer(add_completion=False)

    @demo.command()
    @shared(RUN_OPTIONS, MODEL_OPTIONS, output=Path("runs"))
    def train(data: Path, steps: int = 10, *, opts: Common) -> None:
        seen.append(opts)

    command = typer.main.get_command(demo)
    names = [p.name for p in command.params if p.name != "help"]
    assert names == ["data", "steps", *(n for n in Common.__dataclass_fields__
                                        if n in RUN_OPTIONS + MODEL_OPTIONS)]
    demo(["d", "--steps", "3", "-b", "2", "--device", "cpu", "--offline"],
         standalone_mode=False)
    opts = seen[0]
    assert (opts.batch_size, opts.device, opts.offline, opts.output) == \
        (2, "cpu", True, Path("runs"))
    assert opts.params["data"] == "d" and opts.params["steps"] == 3
    assert opts.params["output"] == "runs" and opts.params["dtype"] == "float32"
    with pytest.raises(TypeError, match="not shared options"):
        shared(("nope",))
    with pytest.raises(TypeError, match="declares shared options itself"):
        shared(RUN_OPTIONS)(lambda input, quiet=False, *, opts: None)
