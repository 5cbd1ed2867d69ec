"""The batch run's image path alone, around a stand-in model: what the CPU side costs per image.

Issue 20 asks whether the readers, the main thread and the writers keep up with a GPU that
edits a 1024 px image in ~4.5 ms.  This script runs the real machinery of a folder run —
:func:`clipinvert.batch.prepared_stream` (reader threads decoding 256 px aligned photos from
disk and resizing them to the encoder's input), the uint8 staging of a batch, and
:class:`clipinvert.batch.OutputWriter` (writer threads encoding 1024 px outputs to disk,
atomically) — around a model that only sleeps ``--model-ms`` per image (``time.sleep``
releases the GIL, as a thread waiting on a GPU does) and hands back 1024 px photo pixels.

Printed per output format and thread count: the main thread's CPU ms per image, the readers'
and writers' core-ms per image (``time.thread_time`` of the threads doing the work), the
images/s sustained, and the rate the core-ms allow on 16 cores on paper.  Run::

    python benchmarks/bench_io.py                       # PNG (fpng), PNG zlib 1, JPEG, WebP, JXL
    python benchmarks/bench_io.py --formats png,jpg --threads 1,2,4 --count 128
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from benchcommon import add_workdir_arguments, clean_workdir, format_table, open_workdir
from PIL import Image

from clipinvert import imaging, timing
from clipinvert.batch import OutputWriter, PrepareOptions, prepared_stream

#: ``--formats`` names: (file suffix, --png-level, fpng allowed)
FORMATS: dict[str, tuple[str, int, bool]] = {
    "png": ("png", 1, True),          # fpng, the default
    "png-zlib1": ("png", 1, False),   # PIL's zlib level 1 (the fallback, and the old default)
    "jpg": ("jpg", 1, True),
    "webp": ("webp", 1, True),
    "jxl": ("jxl", 1, True),
}
PAPER_CORES = 16


def parse_formats(text: str) -> tuple[str, ...]:
    """``png,jpg`` → ``("png", "jpg")``; an unknown name is an argparse error."""
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown format(s) {', '.join(bad) or '(none)'}: use {', '.join(FORMATS)}")
    return names


def parse_counts(text: str) -> tuple[int, ...]:
    """``1,2,4`` → ``(1, 2, 4)``, each at least 1."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give numbers of 1 or more: {text!r}")
    return values


def paper_rate(cores: int, reader_ms: float, writer_ms: float, main_ms: float) -> float:
    """Images/s the CPU side allows on ``cores`` cores, on paper: the cores spread the readers'
    and writers' core-ms (``cores * 1000 / (reader + writer)``), and the one main thread caps
    it at ``1000 / main_ms``.  Not counted: what holds the GIL in the writers (fpng does, see
    docs/performance.md) and the model itself."""
    per = reader_ms + writer_ms
    rates = [cores * 1000.0 / per if per > 0 else float("inf")]
    if main_ms > 0:
        rates.append(1000.0 / main_ms)
    return min(rates)


def write_inputs(directory: Path, count: int, size: int) -> list[Path]:
    """``count`` distinct aligned-size JPEGs of the astronaut (quality 95, as a user's
    aligned crops would be)."""
    from skimage import data  # a test dependency; imported here so --help works without it

    directory.mkdir(parents=True, exist_ok=True)
    base = np.asarray(Image.fromarray(data.astronaut()).resize((size, size),
                                                                Image.Resampling.LANCZOS))
    paths = []
    for i in range(count):
        p = directory / f"in-{i:05d}.jpg"
        Image.fromarray(np.roll(base, 3 * i, axis=1)).save(p, quality=95)
        paths.append(p)
    return paths


def output_pixels(size: int, variants: int = 8) -> list[np.ndarray]:
    """The stand-in model's outputs: ``variants`` shifted ``size``² astronauts (real-photo
    content, so encoders work as hard as on an edit)."""
    from skimage import data

    base = np.asarray(Image.fromarray(data.astronaut()).resize((size, size),
                                                                Image.Resampling.BICUBIC))
    return [np.ascontiguousarray(np.roll(base, 11 * k, axis=0)) for k in range(variants)]


class StandInModel:
    """Takes a staged uint8 batch, sleeps ``ms`` per image with the GIL released (a thread
    waiting on a GPU), returns finished output pixels (as if the D2H copy had landed)."""

    def __init__(self, ms: float, outputs: list[np.ndarray]) -> None:
        self.ms, self.outputs, self.k = ms, outputs, 0

    def __call__(self, staged: np.ndarray) -> list[imaging.PendingPixels]:
        time.sleep(self.ms * len(staged) / 1000.0)
        out = []
        for _ in range(len(staged)):
            out.append(imaging.PendingPixels(self.outputs[self.k % len(self.outputs)]))
            self.k += 1
        return out


@contextlib.contextmanager
def _no_fpng(off: bool) -> Iterator[None]:
    """PNG through PIL's zlib (fpng hidden, as where it is not installed)."""
    if not off:
        yield
        return
    saved = sys.modules.get("fpng")
    sys.modules["fpng"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("fpng", None)
        else:
            sys.modules["fpng"] = saved


def run_path(inputs: Sequence[Path], out_dir: Path, fmt: str, threads: int, batch: int,
             model: StandInModel, in_size: int) -> dict[str, Any]:
    """One pass of the image path over ``inputs``: readers → staging → model → writers."""
    suffix, level, fpng_ok = FORMATS[fmt]
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [(p, Path(p.stem)) for p in inputs]
    was = timing.ENABLED
    timing.set_enabled(True)  # the writers' core time (clipinvert.timing's totals)
    writer = OutputWriter(threads)
    staging = np.empty((batch, in_size, in_size, 3), dtype=np.uint8)
    reader_s = 0.0
    pending: list[Any] = []
    inflight: list[list[Any]] = []
    done = 0
    with _no_fpng(not fpng_ok):
        wall0, main0 = time.perf_counter(), time.thread_time()

        def flush() -> None:
            nonlocal done
            if not pending:
                return
            for i, (_, pixels) in enumerate(pending):
                staging[i] = pixels
            outs = model(staging[:len(pending)])
            for (rel, _), pixels in zip(pending, outs, strict=True):
                writer.save(pixels, out_dir / f"{rel}.{suffix}", level)
            inflight.append(writer.take())
            while len(inflight) > 1:  # the previous batch's files, as run_folder settles them
                for _, future in inflight.pop(0):
                    future.result()
            done += len(pending)
            pending.clear()

        for item in prepared_stream(sources, PrepareOptions(model_size=in_size), threads,
                                    window=2 * batch):
            if item.error:
                raise RuntimeError(f"{item.src}: {item.error}")
            reader_s += item.cpu_s
            pending.append((item.rel, item.crops[0].pixels))
            if len(pending) >= batch:
                flush()
        flush()
        for writes in inflight:
            for _, future in writes:
                future.result()
        writer.close()
        wall = time.perf_counter() - wall0
        main_s = time.thread_time() - main0
    writer_s = timing.totals().get("writer", 0.0)
    timing.set_enabled(was)
    n = max(1, done)
    sizes = [p.stat().st_size for p in out_dir.iterdir()]
    row = {"format": fmt, "threads": threads, "images": done, "wall_s": wall,
           "images_per_s": done / wall, "main_ms": main_s * 1000 / n,
           "reader_core_ms": reader_s * 1000 / n, "writer_core_ms": writer_s * 1000 / n,
           "model_ms": model.ms, "mean_file_kib": sum(sizes) / len(sizes) / 1024}
    row["paper_images_per_s_16_cores"] = paper_rate(PAPER_CORES, row["reader_core_ms"],
                                                    row["writer_core_ms"], row["main_ms"])
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time the batch run's image path (reader threads, staging, writer "
                    "threads) around a stand-in model that sleeps --model-ms per image.")
    p.add_argument("--formats", type=parse_formats, default=tuple(FORMATS),
                   help=f"output formats, comma-separated (default: {','.join(FORMATS)})")
    p.add_argument("--threads", type=parse_counts, default=(1, 2),
                   help="reader and writer threads (each pool this many), comma-separated "
                        "(default: 1,2)")
    p.add_argument("--count", type=int, default=32, help="input photos (default: 32)")
    p.add_argument("--batch", type=int, default=32, help="images per model call (default: 32)")
    p.add_argument("--model-ms", type=float, default=4.5,
                   help="the stand-in model's time per image, GIL released (default: 4.5)")
    p.add_argument("--out-size", type=int, default=1024, help="output side (default: 1024)")
    p.add_argument("--in-size", type=int, default=256,
                   help="aligned input side = the encoder's input (default: 256)")
    add_workdir_arguments(p, "generated input photos and the outputs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count < 1 or args.batch < 1:
        print("error: --count and --batch must be at least 1", file=sys.stderr)
        return 2
    workdir, before = open_workdir(args.workdir, prefix="clipinvert-bench-io-")
    try:
        inputs = write_inputs(workdir / "inputs", args.count, args.in_size)
        model = StandInModel(args.model_ms, output_pixels(args.out_size))
        rows = []
        for fmt in args.formats:
            for threads in args.threads:
                out = workdir / f"out-{fmt}-{threads}"
                rows.append(run_path(inputs, out, fmt, threads, args.batch, model,
                                     args.in_size))
                for p in out.iterdir():  # the disk stays small
                    p.unlink()
    finally:
        if args.keep:
            print(f"kept the work folder {workdir}", file=sys.stderr)
        else:
            clean_workdir(workdir, before)
    print(f"image path, stand-in model {args.model_ms} ms/image (GIL released), batch "
          f"{args.batch}, {args.count} photos {args.in_size}px in, {args.out_size}px out; "
          "core-ms = thread CPU time per image")
    print(format_table(
        ["format", "threads", "img/s", "main ms/img", "reader core-ms", "writer core-ms",
         "KiB/file", f"img/s on {PAPER_CORES} cores (paper)"],
        [[r["format"], str(r["threads"]), f"{r['images_per_s']:.1f}", f"{r['main_ms']:.2f}",
          f"{r['reader_core_ms']:.2f}", f"{r['writer_core_ms']:.2f}",
          f"{r['mean_file_kib']:.0f}", f"{r['paper_images_per_s_16_cores']:.0f}"]
         for r in rows]))
    print(f"paper rate: images/s = min({PAPER_CORES} cores × 1000 / (reader + writer core-ms), "
          "1000 / main ms); the model's own rate at --model-ms is "
          f"{1000 / args.model_ms:.0f} img/s")
    if args.json:
        args.json.write_text(json.dumps({"model_ms": args.model_ms, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
