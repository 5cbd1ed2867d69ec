"""Shared fixtures: a tiny random-weight domain written in the released file layouts.

Tests never download: open_clip is kept offline and the user's own config/cache folders are
replaced by temporary ones so a developer's ~/.config/clipinvert cannot leak into results.
That temporary folder (it also holds the loaders' safetensors copies, hundreds of MB) is
removed when the test process exits; pytest's own tmp_path folders are kept only for failed
tests (``tmp_path_retention_policy`` in pyproject.toml, and ``_keep_only_failed_tests_folders``
below for the folders fixtures share).  Every process the tests start gets ``TMPDIR`` inside it,
so what they leave there (torchrun's ``torchelastic_*`` folders) goes with it.

The suite runs PyTorch on one thread, and so does every process it starts: on a machine whose
cores other processes also use (CI, a shared 2-core box), PyTorch's default of one thread per
core made the suite several times slower (40 tiny edits: 33–37 s against 3.1 s), since every
thread waits for the slowest at each operation.  The tiny models gain nothing from more.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

# Before torch is imported (here, below), so its thread pools start at one thread; the CLI's
# thread budget (clipinvert.runtime) honours OMP_NUM_THREADS too, in-process and in children.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)  # in case a plugin imported torch before this file

os.environ["HF_HUB_OFFLINE"] = "1"
_ISOLATED = Path(tempfile.mkdtemp(prefix="clipinvert-tests-"))
os.environ["XDG_CONFIG_HOME"] = str(_ISOLATED / "config")
os.environ["CLIPINVERT_HOME"] = str(_ISOLATED / "cache")
# open_clip's import makes torch create $TMPDIR/torchinductor_$USER; keep it in here too.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_ISOLATED / "torchinductor")
# Child processes' temporary files go in here (torchrun leaves a torchelastic_* folder per
# launch); this process keeps the system's, where pytest keeps a failed test's folders.
tempfile.tempdir = tempfile.gettempdir()
(_ISOLATED / "tmp").mkdir()
os.environ["TMPDIR"] = str(_ISOLATED / "tmp")
# Registered before anything imports clipinvert, so it runs last at exit (atexit is LIFO), and
# it also runs after a failed or interrupted session.
atexit.register(shutil.rmtree, _ISOLATED, ignore_errors=True)
os.environ.pop("CLIPINVERT_MODELS", None)


_FAILED_TESTS_FOLDERS: set[Path] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Notes the tmp_path of every failed test (see ``_keep_only_failed_tests_folders``)."""
    report = yield
    folder = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(folder, Path):
        _FAILED_TESTS_FOLDERS.add(folder)
    return report


@pytest.fixture(scope="session", autouse=True)
def _keep_only_failed_tests_folders(request: pytest.FixtureRequest,
                                    tmp_path_factory: pytest.TempPathFactory):
    """After a session with failures, pytest keeps every folder of its base temp, fixtures'
    shared ones too (the tiny domains, checkpoints: 0.9 GB in a full run); only the failed
    tests' own tmp_path folders help to see what went wrong, so the rest goes."""
    yield
    # a pytest-xdist worker's --basetemp is its own folder in the session's, not the user's
    given = request.config.option.basetemp and not hasattr(request.config, "workerinput")
    if not request.session.testsfailed or given:
        return  # a passing session's folder pytest removes; a --basetemp given is the user's
    for entry in tmp_path_factory.getbasetemp().iterdir():
        # pytest's "…current" links to removed folders are removed by pytest itself
        if entry not in _FAILED_TESTS_FOLDERS and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture(scope="session")
def torchrun() -> list[str]:
    """``python -m torch.distributed.run`` through an interpreter at
    ``…/clipinvert/.venv/bin/python3``: every torchrun the tests start runs in CI's layout
    (a clone named ``clipinvert`` with its ``.venv`` inside), wherever this checkout lies
    (see ``torchrun_helpers.venv_python``)."""
    from torchrun_helpers import torchrun_command, venv_python

    return torchrun_command(venv_python(_ISOLATED / "clipinvert"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models.toml of a complete tiny domain named "tiny" (32px generator, 8 W+ styles, a narrow
    IR-SE encoder with one unit per stage: milliseconds per image).

    The same folder also holds that domain with the *released* IR-SE50 encoder widths (seconds
    per image), as ``released.toml`` naming the plain ``e4e.pt`` / ``clipinverter.pt``: the
    ``editor`` fixture uses it, because tests/golden/tiny_edit.pt was recorded with those
    tensors and test_reference_edit checks ``editor`` against ``e4e.pt`` / ``clipinverter.pt``
    in this folder.  The tiny domain's files are ``tiny-e4e.pt`` / ``tiny-clipinverter.pt``.
    """
    from clipinvert.testing.models import write_domain

    directory = tmp_path_factory.mktemp("tiny-domain")
    write_domain(directory, encoder="released", toml_name="released.toml")
    return write_domain(directory, encoder="tiny", file_prefix="tiny-")


@pytest.fixture(scope="session")
def tiny_files(tiny_models: Path) -> dict[str, Path | str]:
    """The fast tiny domain's files by role, for ``Editor.from_files(**tiny_files)`` and the
    loaders (the plain ``e4e.pt`` / ``clipinverter.pt`` beside them are the released-width twin).
    """
    root = tiny_models.parent
    return {"e4e": root / "tiny-e4e.pt", "clipinverter": root / "tiny-clipinverter.pt",
            "clip": root / "clip-tiny-open_clip.pt", "clip_arch": str(root / "clip-tiny.json")}


@pytest.fixture(scope="session")
def tiny_editor(tiny_models: Path):
    """An Editor on the fast tiny domain (narrow encoder): for behaviour, not golden values."""
    from clipinvert import Editor

    return Editor("tiny", models=tiny_models, device="cpu")


@pytest.fixture(scope="session")
def editor(tiny_models: Path):
    """An Editor on the released-width twin of ``tiny_models`` (see there)."""
    from clipinvert import Editor

    return Editor("tiny", models=tiny_models.with_name("released.toml"), device="cpu")


@pytest.fixture(scope="session")
def face_crop() -> Image.Image:
    """A real photo (scikit-image's astronaut), cropped around the face, 256×256."""
    from skimage import data

    return Image.fromarray(data.astronaut()).crop((140, 30, 310, 200)).resize((256, 256))


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """scikit-image's astronaut, whole (512×512): the real face photo of the alignment tests."""
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def detector():
    """dlib's face detector and 68-point predictor, loaded once for the session."""
    from clipinvert.align import FaceDetector

    return FaceDetector()


@pytest.fixture(scope="session")
def cat_photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())
