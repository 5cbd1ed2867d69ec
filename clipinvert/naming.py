"""Output names: which file each input becomes, with no two inputs ever writing the same path.

The rules users can rely on (README, "Batch runs"):

* ``OUT/<relative path without suffix>.png`` is the layout.  Only when two inputs share that stem
  (``a.jpg`` and ``a.png``) do the clashing ones carry their suffix (``a_jpg``, ``a_png``), with a
  warning line and the mapping in the report.
* Every output path is *claimed* by one input.  An input whose outputs would land on a path
  already claimed — by another input's outputs (a prompt folder named like the compare folder,
  an input sub-folder named ``compare``, a face suffix that another file already has) or by an
  input image itself — gets ``-2``, ``-3``… appended to its name instead: one side is renamed,
  nothing is overwritten.
* The output folder is never the input folder and never lies where the walk would read it back.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .errors import UsageError

# Sub-folders of OUT that the tool itself writes into (prompt folders must not take them).
RESERVED_FOLDERS = frozenset({"compare"})


def slugify(text: str, max_len: int = 60) -> str:
    """Readable folder name for a prompt: 'She has wavy hair!' → 'she-has-wavy-hair'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def unique_slugs(texts: Sequence[str], reserved: Iterable[str] = RESERVED_FOLDERS) -> list[str]:
    """One folder name per prompt: distinct from each other and from the tool's own folders."""
    taken = set(reserved)
    out: list[str] = []
    for i, t in enumerate(texts):
        s = slugify(t)
        if s in taken:
            base, n = f"{s}-{i + 1}", 2
            s = base
            while s in taken:
                s, n = f"{base}-{n}", n + 1
        taken.add(s)
        out.append(s)
    return out


def output_stems(rels: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Output stems for inputs' relative paths, and one warning line per clash of stems.

    ``photo.jpg`` → ``photo``; when ``photo.jpg`` and ``photo.png`` are both inputs (compared
    case-insensitively, so the layout is the same on every file system) they become
    ``photo_jpg`` and ``photo_png``.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rel in enumerate(rels):
        groups[rel.with_suffix("").as_posix().casefold()].append(i)
    stems = [rel.with_suffix("") for rel in rels]
    warnings = []
    for members in groups.values():
        if len(members) < 2:
            continue
        for i in members:
            rel = rels[i]
            suffix = rel.suffix.lstrip(".").lower() or "noext"
            stems[i] = rel.with_name(f"{rel.stem}_{suffix}")
        names = ", ".join(rels[i].as_posix() for i in members)
        renamed = ", ".join(stems[i].name for i in members)
        warnings.append(f"{names} share an output name: they are written as {renamed}")
    return stems, warnings


class Claims:
    """Output paths already promised to an input (or that are inputs); renames late-comers."""

    def __init__(self, inputs: Iterable[Path] = ()) -> None:
        self._owner: dict[str, str] = {}
        self._inputs = {_key(p) for p in inputs}

    def clash(self, paths: Iterable[Path], owner: str) -> str | None:
        """Why ``paths`` cannot be ``owner``'s: the first path taken, or None.  An output that
        would be an input image is a usage error: the user pointed -o at their photos."""
        for p in paths:
            k = _key(p)
            if k in self._inputs:
                raise UsageError(f"output {p} would replace an input image (it is an input): "
                                 "choose another -o")
            other = self._owner.get(k)
            if other is not None and other != owner:
                return f"{p} is already an output of {other}"
        return None

    def claim(self, stem: Path, owner: str, outputs_for: Callable[[Path], list[Path]],
              limit: int = 1000) -> tuple[Path, str | None]:
        """The first of ``stem``, ``stem-2``, ``stem-3``… whose outputs are all free; claims them.

        Returns the stem and, when it had to be renamed, why (for the warning line).
        """
        why = None
        for n in range(1, limit + 1):
            cand = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
            paths = outputs_for(cand)
            reason = self.clash(paths, owner)
            if reason is None:
                for p in paths:
                    self._owner[_key(p)] = owner
                return cand, why
            why = why or reason
        raise UsageError(f"cannot find a free output name for {owner} ({why})")


def _key(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


# Suffixes that say "a file" (what the commands write, and photo formats): an -o ending in one
# that does not exist yet is a file name given by mistake, not a folder to create.
FILE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                           ".heic", ".avif", ".mp4", ".pt", ".json"})


def check_output_folder(output: Path, inputs: Path | None = None) -> None:
    """Usage errors (exit 2) found before any model is loaded; creates nothing.

    The output must be a folder we can write into (or create), and not the input folder itself:
    with ``-o`` equal to the input every photo would count as its own finished output, and
    ``--overwrite`` would replace the originals.  A missing ``-o`` with an image suffix
    (``-o edited.png``) is refused: outputs are always named after their inputs inside a
    folder, and silently making a folder called ``edited.png`` surprises everyone.

    A missing folder is not created here: its nearest existing parent must be a folder this
    process may write into.  The run itself creates it when it takes the folder
    (:func:`clipinvert.outlock.claim_output`) and removes it again if it stops before writing
    anything, so a refused run leaves no folder behind.  (Creating and removing it here raced
    with a process that had just taken the folder: the ranks of one torchrun launch all check
    it while rank 0 takes it.)
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output}: exists and is not a folder")
    if not output.exists() and output.suffix.lower() in FILE_SUFFIXES:
        raise UsageError(f"-o {output}: -o is an output folder, and outputs are named after "
                         f"their inputs; give a folder, e.g. -o {output.parent / output.stem}/ "
                         f"(the result is {output.parent / output.stem}/<input stem>.png)")
    if inputs is not None and Path(inputs).is_dir() and _same(output, Path(inputs)):
        raise UsageError(f"-o {output} is the input folder: outputs would mix with (and with "
                         "--overwrite replace) the input images; choose another -o")
    if not output.is_dir():
        parent = output.parent
        while not parent.exists() and parent.parent != parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"-o {output}: a parent is not a folder ({parent})")
        try:  # a probe of our own beside where the folder will go, never the folder itself
            os.rmdir(tempfile.mkdtemp(prefix=".clipinvert-write-test-", dir=parent))
        except OSError as exc:
            raise UsageError(f"-o {output}: cannot create the folder ({exc.strerror or exc})") \
                from None
        return
    probe = output / f".clipinvert-write-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"-o {output}: cannot write into the folder "
                         f"({exc.strerror or exc})") from None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
