"""``clipinvert serve``: the editor as a local web page (docs/serve.md).

Two layers, so that everything the page does can be tested without a browser or gradio:

* :mod:`clipinvert.serve.app` — the request layer: checks an upload (size, pixels, a real
  image), the prompts and the numbers, then runs the very jobs the CLI runs
  (:func:`clipinvert.jobs.run_edit`, :func:`~clipinvert.jobs.run_interpolate`) on a
  private temporary folder — or, for edit requests of several users waiting together, the same
  steps with one model pass for all of them — and hands back result files that carry their
  settings.  No gradio.
* :mod:`clipinvert.serve.ui` — the gradio page over it, imported only by ``clipinvert serve``
  (gradio is the optional ``serve`` extra).
"""
