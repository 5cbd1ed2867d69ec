"""Shared fixtures: a tiny random-weight domain written in the released file layouts.

Tests never download: open_clip is kept offline and the user's own config/cache folders are
replaced by temporary ones so a developer's ~/.config/clipinvert cannot leak into results.
That temporary folder (it also holds the loaders' safetensors copies, hundreds of MB) is
removed when the test process exits; pytest's own tmp_path folders are kept only for failed
tests (``tmp_path_retention_policy`` in pyproject.toml).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
_ISOLATED = Path(tempfile.mkdtemp(prefix="clipinvert-tests-"))
os.environ["XDG_CONFIG_HOME"] = str(_ISOLATED / "config")
os.environ["CLIPINVERT_HOME"] = str(_ISOLATED / "cache")
# open_clip's import makes torch create $TMPDIR/torchinductor_$USER; keep it in here too.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_ISOLATED / "torchinductor")
# Registered before anything imports clipinvert, so it runs last at exit (atexit is LIFO), and
# it also runs after a failed or interrupted session.
atexit.register(shutil.rmtree, _ISOLATED, ignore_errors=True)
os.environ.pop("CLIPINVERT_MODELS", None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models.toml of a complete tiny domain named "tiny" (32px generator, 8 W+ styles)."""
    from clipinvert.testing.models import write_domain

    return write_domain(tmp_path_factory.mktemp("tiny-domain"))


@pytest.fixture(scope="session")
def editor(tiny_models: Path):
    from clipinvert import Editor

    return Editor("tiny", models=tiny_models, device="cpu")


@pytest.fixture(scope="session")
def face_crop() -> Image.Image:
    """A real photo (scikit-image's astronaut), cropped around the face, 256×256."""
    from skimage import data

    return Image.fromarray(data.astronaut()).crop((140, 30, 310, 200)).resize((256, 256))


@pytest.fixture(scope="session")
def cat_photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())
