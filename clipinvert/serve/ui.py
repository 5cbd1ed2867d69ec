"""The gradio page of ``clipinvert serve`` over :class:`~clipinvert.serve.app.Service`.

Imported only by the ``serve`` command (gradio is the optional ``serve`` extra), and only after
:func:`offline_environment` has made gradio keep to this machine: no analytics or version
check, no share link unless asked, no web fonts (the theme uses the system's), and its upload
cache in a temporary folder of this process's own: the page's files go when it closes, the
folder when the process ends (:func:`gradio_temp_dir`).

What the page hands to the request layer: an upload's *bytes*, read from gradio's upload cache
only after checking that the file gradio names lies inside that cache (gradio checks it too);
no path the browser sends is opened otherwise.  Every failure becomes a message in the page
(HTML-escaped: gradio renders error text as HTML), and the server goes on.
"""

from __future__ import annotations

import atexit
import base64
import html
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ClipInvertError
from .app import (
    ANIMATION_FORMATS,
    AnimateRequest,
    EditRequest,
    Outcome,
    Service,
    Upload,
    describe,
    file_size,
)

#: Prompts in the spirit of the paper's figures, per domain (others get the faces' ones).
EXAMPLE_PROMPTS = {
    "faces": ["she has wavy blond hair", "he has a beard and glasses", "this person is smiling",
              "the man has grey hair and a mustache", "she wears heavy makeup and lipstick",
              "this person has bangs"],
    "cats": ["a cat with blue eyes", "a ginger cat with long fur", "a black cat"],
    "birds": ["this bird has a red crown and black wings", "a small yellow bird with a short beak",
              "this bird is blue with white belly"],
}

CSS = """
#photo img, #reference img {object-fit: contain}
"""


#: gradio's temporary folder for this process (see :func:`gradio_temp_dir`); None until made.
_process_temp: Path | None = None


def gradio_temp_dir() -> Path:
    """The folder gradio keeps uploads and its cache in: one per *process*, removed at exit.

    Why not one per page: gradio reads ``GRADIO_TEMP_DIR`` into module constants when it is
    first imported, so a second page in the same process (a notebook, a test session) would
    still write into the first page's folder after that page had removed it, and leave it
    behind.  Each page deletes its own files when it closes (``delete_cache``); the folder
    itself goes with the process.  A ``GRADIO_TEMP_DIR`` the user set is theirs: used as it
    is and never removed.
    """
    global _process_temp
    if _process_temp is None:
        if os.environ.get("GRADIO_TEMP_DIR"):
            return Path(os.environ["GRADIO_TEMP_DIR"])
        _process_temp = Path(tempfile.mkdtemp(prefix="clipinvert-gradio-"))
        atexit.register(shutil.rmtree, _process_temp, ignore_errors=True)
    return _process_temp


def offline_environment() -> None:
    """Settings gradio reads from the environment, set before it is imported: no analytics,
    uploads kept in this process's own temporary folder."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_temp_dir())


def _upload(payload: Any, what: str, service: Service) -> Upload | None:
    """The bytes of a file the browser uploaded (gradio's ``FileData`` payload), or None."""
    from gradio.utils import get_upload_folder

    if not payload:
        return None
    if not isinstance(payload, dict):
        raise ClipInvertError(f"{what}: unexpected upload")
    limit = service.limits.max_bytes
    name = str(payload.get("orig_name") or "upload")
    url = payload.get("url") or ""
    path = payload.get("path")
    if not path and url.startswith("data:"):  # pasted without a file upload
        encoded = url.partition(",")[2]
        if len(encoded) * 3 // 4 > limit:
            raise ClipInvertError(f"{what}: larger than {file_size(limit)}")
        return Upload(name, base64.b64decode(encoded))
    cache = Path(get_upload_folder()).resolve()
    where = Path(str(path)).resolve() if path else None
    if where is None or not where.is_relative_to(cache) or not where.is_file():
        raise ClipInvertError(f"{what}: not an uploaded file; upload it again")
    if where.stat().st_size > limit:
        raise ClipInvertError(f"{what}: {file_size(where.stat().st_size)}, the limit is "
                              f"{file_size(limit)}")
    return Upload(Path(name).name, where.read_bytes())


def _guard(run: Callable[..., Any]) -> Callable[..., Any]:
    """A handler whose failures are a message in the page, never a dead request thread."""
    import functools

    import gradio as gr

    @functools.wraps(run)
    def handler(*args: Any) -> Any:
        try:
            return run(*args)
        except ClipInvertError as exc:
            raise gr.Error(html.escape(str(exc)), title="Cannot do that",
                           print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the server goes on; the log has the rest
            traceback.print_exc(file=sys.stderr)
            raise gr.Error(html.escape(f"unexpected error: {type(exc).__name__}: {exc}"),
                           print_exception=False) from None

    return handler


def _notes(outcome: Outcome) -> str:
    lines = [f"warning: {w}" for w in outcome.warnings]
    if outcome.commands:
        lines.append("The same pixels from the command line:")
        lines += outcome.commands
    return "\n".join(lines)


def build(service: Service, *, queue_size: int = 16):
    """The page (a ``gr.Blocks``), its queue bounded at ``queue_size`` waiting requests.

    Up to ``service.max_batch`` edit requests are handed to the service at once, which runs
    those that wait for the model together (:meth:`Service.edit`; one model in memory, see
    docs/serve.md#several-users).  Not gradio's own ``batch=True``: there an exception fails
    every request of the batch, so one user's bad upload could not stay that user's message;
    here each request keeps its own handler, and its own error.  Animations run one at a time.
    """
    import gradio as gr

    status = service.status()
    lim = service.limits
    aligns = status.align == "ffhq"
    examples = EXAMPLE_PROMPTS.get(status.domain, EXAMPLE_PROMPTS["faces"])

    def request_fields(photo, prompts, reference, strength, paste_back, all_faces, aligned):
        return dict(photo=_upload(photo, "photo", service), prompts=prompts or "",
                    reference=_upload(reference, "reference image", service),
                    strength=float(strength), paste_back=bool(paste_back),
                    all_faces=bool(all_faces), aligned=bool(aligned))

    @_guard
    def edit(*form):
        outcome = service.edit(EditRequest(**request_fields(*form)))
        return ([(str(r.path), r.label) for r in outcome.results],
                str(outcome.strips[0]) if outcome.strips else None,
                [str(r.path) for r in outcome.results] + [str(p) for p in outcome.strips],
                _notes(outcome))

    @_guard
    def animate(*form):
        *edit_form, steps, fps, formats, boomerang = form
        outcome = service.animate(AnimateRequest(
            **request_fields(*edit_form), steps=int(steps), fps=float(fps),
            formats=tuple(formats or ("gif",)), boomerang=bool(boomerang)))
        preview = next((str(p) for p in outcome.animations if p.suffix == ".gif"), None)
        return (preview, str(outcome.strips[0]) if outcome.strips else None,
                [str(p) for p in outcome.animations + outcome.strips], _notes(outcome))

    def current_status() -> str:
        now = service.status()
        text = "\n".join(describe(now))
        return text + (f"\n\nmissing weights: {now.problem}" if now.problem else "")

    with gr.Blocks(title="clipinvert", delete_cache=(600, 3600)) as demo:
        gr.Markdown("## clipinvert — edit a photo with a sentence\n"
                    "Upload (or drag, or paste) a photo, type what it should look like, "
                    "press **Edit**." + (" The face is aligned as `clipinvert edit` aligns it."
                                         if aligns else ""))
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.Image(label="Photo", type="filepath", image_mode=None, height=300,
                                 sources=["upload", "clipboard"], elem_id="photo")
                with gr.Tabs():
                    with gr.Tab("Text"):
                        prompts = gr.Textbox(
                            label=f"Prompts (one per line, at most {lim.max_prompts})",
                            lines=3, max_length=(lim.max_prompt_chars + 1) * lim.max_prompts,
                            placeholder=examples[0], elem_id="prompts")
                        gr.Examples([[p] for p in examples], inputs=[prompts],
                                    label="Example prompts")
                    with gr.Tab("Reference image"):
                        reference = gr.Image(label="Take the look from this image",
                                             type="filepath", image_mode=None,
                                             sources=["upload", "clipboard"], elem_id="reference")
                strength = gr.Slider(-1, 2, value=1.0, step=0.05, label="Strength (0 = the "
                                     "inversion, 1 = as trained)", elem_id="strength")
                with gr.Row():
                    paste_back = gr.Checkbox(False, label="Paste back into the photo",
                                             visible=aligns, elem_id="paste-back")
                    all_faces = gr.Checkbox(False, label="Every face", visible=aligns,
                                            elem_id="all-faces")
                    aligned = gr.Checkbox(False, label="Already an aligned crop",
                                          visible=aligns, elem_id="aligned")
                run = gr.Button("Edit", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                results = gr.Gallery(label="Results", columns=4, height=300, preview=False,
                                     object_fit="contain", elem_id="results")
                # an Image, not a Gallery: a wide strip shown whole (a gallery's square tiles
                # shrink it out of sight); every face's strip is among the downloads too
                strips = gr.Image(label="Input | inversion | edits", type="filepath",
                                  height=200, interactive=False, elem_id="strips")
                downloads = gr.File(label="Download (PNG, settings in its metadata)",
                                    file_count="multiple", elem_id="downloads")
                notes = gr.Textbox(label="Notes", lines=2, interactive=False, elem_id="notes")
        with gr.Accordion("Animation: from the inversion to the edit", open=False):
            with gr.Row():
                steps = gr.Slider(2, lim.max_steps, value=8, step=1, label="Frames")
                fps = gr.Slider(1, lim.max_fps, value=8, step=1, label="Frames per second")
                formats = gr.CheckboxGroup(list(ANIMATION_FORMATS), value=["gif"],
                                           label="Formats")
                boomerang = gr.Checkbox(False, label="Forth and back")
            animate_button = gr.Button("Animate", elem_id="animate")
            with gr.Row():
                preview = gr.Image(label="Animation", type="filepath", elem_id="animation")
                strip = gr.Image(label="Frames", type="filepath", height=200,
                                 interactive=False, elem_id="frames")
            animations = gr.File(label="Download the animation", file_count="multiple",
                                 elem_id="animations")
        model_text = gr.Textbox(current_status(), label="Model", lines=4, interactive=False,
                                elem_id="model")

        form = [photo, prompts, reference, strength, paste_back, all_faces, aligned]
        # preprocess=False: the uploads arrive as gradio's FileData (a path in its upload
        # cache) and are decoded by clipinvert's loader, not by gradio's
        run.click(edit, form, [results, strips, downloads, notes], preprocess=False,
                  concurrency_limit=service.max_batch, concurrency_id="edit",
                  api_name="edit").then(current_status, None, model_text, queue=False)
        animate_button.click(animate, [*form, steps, fps, formats, boomerang],
                             [preview, strip, animations, notes], preprocess=False,
                             concurrency_limit=1, concurrency_id="animate", api_name="animate")
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def theme():
    """gradio's default look with the system's fonts: nothing is fetched to draw the page."""
    import gradio as gr

    return gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                             font_mono=("ui-monospace", "Consolas", "monospace"))


def launch(service: Service, *, host: str = "127.0.0.1", port: int | None = 7860,
           share: bool = False, queue_size: int = 16, quiet: bool = True):
    """Start the page in a background thread; returns ``(demo, local_url)``."""
    offline_environment()
    demo = build(service, queue_size=queue_size)
    try:
        _, url, _ = demo.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=True,
            quiet=quiet, inbrowser=False, show_error=False,
            max_file_size=service.limits.max_bytes, ssr_mode=False, pwa=False,
            mcp_server=False, enable_monitoring=False, theme=theme(), css=CSS, footer_links=[])
    except BaseException:  # Ctrl-C while it starts, a port in use: no server left running
        demo.close(verbose=False)
        raise
    return demo, url
