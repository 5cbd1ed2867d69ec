"""Face alignment at scale: what today's dlib path costs per megapixel, stage by stage, and how
far detection on a downscaled copy moves the crop.

Why this exists: alignment is CPU work ahead of the model, and dlib's HOG search (run with one
upsampling step, as the released alignment does: ``FaceDetector.upsample``) costs in proportion
to the pixels, four times the photo's with the upsampling.  The 68-point predictor does not (a
fixed number of lookups per face).  Detecting on a copy whose long side is at most N px and
placing the landmarks at full resolution (``--detect-size N``) is therefore fast — but the box
differs from full-resolution detection's, so the landmarks and the crop move.  This script gives
both figures, measured the same way each time.

Part 1, stages (scikit-image's astronaut upscaled with Pillow LANCZOS to each size, saved as
JPEG quality 95), fastest of ``--repeats`` after one warm-up:

=========  ==================================================================================
load       ``imaging.load_image`` (JPEG decode, EXIF orientation)
detect     ``FaceDetector.find``: the HOG search on the whole photo (today's path)
copy       ``FaceDetector.find(detect_size=N)``: resize to long side N + HOG search on the copy
landmarks  ``FaceDetector.landmarks``: the 68 points in the best box, full resolution
quad       ``ffhq_quad``
crop       ``align_ffhq``: shrink, crop, pad, warp to 256 px
=========  ==================================================================================

Part 2, variants (``--variants``): today's path against ``detect_size=N`` on the astronaut at
0.5×, 2× and 4×, rotated ±10° and ±25° (of the 4× photo, ``expand=True``), mirrored (4×), and
pasted small into a 4000×3000 grey canvas: the largest quad-corner difference in full-resolution
pixels (and as a share of the quad's side), the crops' largest pixel difference and PSNR, and the
detection times (fastest of ``--repeats``).  A reference row shifts the 4× photo by one pixel
(today's path on both): how much today's own crop moves for a change no one would call a
different photo.

Runs single-core: ``OMP_NUM_THREADS=1`` is set before numpy loads (dlib is single-threaded
anyway).  Examples::

    python benchmarks/bench_align.py                       # stages at 0.25, 1, 4, 12, 24 MP
    python benchmarks/bench_align.py --variants --detect-size 1024 --json align.json
    python benchmarks/bench_align.py --sizes 0.25,1 --repeats 1 --variants-quick   # smoke test
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
from benchcommon import cpu_name, format_table, positive_int, psnr_8bit  # noqa: E402

T = TypeVar("T")
STAGES = ("load", "detect", "copy", "landmarks", "quad", "crop")
LANCZOS = PIL.Image.Resampling.LANCZOS


def astronaut() -> PIL.Image.Image:
    from skimage import data

    return PIL.Image.fromarray(data.astronaut())


def timed(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Fastest seconds of ``repeats`` calls after one untimed warm-up, and the last result.

    The fastest, not the median: the work is deterministic single-core CPU work, so a slower
    run only measures other processes taking the core (a shared machine's helpers, CI)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def stage_row(detector: Any, photo: PIL.Image.Image, path: Path, detect_size: int,
              repeats: int) -> dict[str, Any]:
    """Seconds of each stage on one photo (already saved at ``path``)."""
    from clipinvert.align import align_ffhq, ffhq_quad
    from clipinvert.imaging import load_image

    secs: dict[str, float] = {}
    secs["load"], image = timed(lambda: load_image(path), repeats)
    array = np.asarray(image)
    secs["detect"], (boxes, scores, _) = timed(lambda: detector.find(array), repeats)
    secs["copy"], (_b, _s, small) = timed(lambda: detector.find(array, detect_size), repeats)
    if not boxes:
        raise SystemExit(f"no face found at {image.size}: the stages need one")
    best = boxes[int(np.argmax(scores))]
    secs["landmarks"], points = timed(lambda: detector.landmarks(array, best), repeats)
    secs["quad"], _ = timed(lambda: ffhq_quad(points), repeats)
    secs["crop"], _ = timed(lambda: align_ffhq(image, points), repeats)
    megapixels = image.width * image.height / 1e6
    today = sum(secs[s] for s in STAGES if s != "copy")
    with_copy = today - secs["detect"] + secs["copy"]
    return {"size": list(image.size), "megapixels": megapixels, "copy_size": small,
            "ms": {s: 1e3 * v for s, v in secs.items()},
            "ms_per_mp": {s: 1e3 * v / megapixels for s, v in secs.items()},
            "total_ms": 1e3 * today, "total_copy_ms": 1e3 * with_copy,
            "speedup": today / with_copy}


def variants(base: PIL.Image.Image, quick: bool) -> dict[str, PIL.Image.Image]:
    """The photos today's path and the copy are compared on (see the module docstring)."""
    side = base.width
    big = base.resize((4 * side, 4 * side), LANCZOS)
    out = {"0.5x": base.resize((side // 2, side // 2), LANCZOS)}
    if quick:
        return {**out, "1x": base}
    out["2x"] = base.resize((2 * side, 2 * side), LANCZOS)
    out["4x"] = big
    for angle in (-25, -10, 10, 25):
        out[f"4x rot {angle:+d}"] = big.rotate(angle, PIL.Image.Resampling.BICUBIC, expand=True)
    out["4x mirrored"] = big.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    canvas = PIL.Image.new("RGB", (4000, 3000), (128, 128, 128))
    canvas.paste(base, (2900, 400))
    out["pad 4000x3000"] = canvas
    return out


def compare(detector: Any, name: str, photo: PIL.Image.Image, detect_size: int, repeats: int,
            reference: tuple[PIL.Image.Image, float] | None = None) -> dict[str, Any]:
    """Today's path against ``detect_size`` on one photo (or, with ``reference``, today's path
    on a photo shifted by ``reference[1]`` px against today's on ``reference[0]``)."""
    from clipinvert.align import align_ffhq, ffhq_quad

    def one(image: PIL.Image.Image, size: int | None) -> tuple[float, Any]:
        array = np.asarray(image)
        secs, (boxes, scores, small) = timed(lambda: detector.find(array, size), repeats)
        if not boxes:
            raise SystemExit(f"{name}: no face found")
        points = detector.landmarks(array, boxes[int(np.argmax(scores))])
        return secs, (points, small)

    base, shift = reference if reference is not None else (photo, 0.0)
    t_full, (lm_full, _) = one(base, None)
    t_other, (lm_other, small) = one(photo, None if reference else detect_size)
    lm_other = lm_other - shift
    quad_full, qsize = ffhq_quad(lm_full)
    quad_other, _ = ffhq_quad(lm_other)
    delta = float(np.abs(quad_other - quad_full).max())
    crop_full = np.asarray(align_ffhq(base, lm_full)[0], dtype=np.int16)
    crop_other = np.asarray(align_ffhq(base, lm_other)[0], dtype=np.int16)
    diff = np.abs(crop_full - crop_other)
    return {"variant": name, "size": list(photo.size), "copy_size": small,
            "fell_back": reference is None and small is None
            and max(photo.size) > detect_size,
            "qsize": qsize, "quad_delta_px": delta, "quad_delta_rel": delta / qsize,
            "crop_max_diff": int(diff.max()),
            "crop_psnr_db": psnr_8bit(float(np.mean(diff.astype(np.float64) ** 2))),
            "detect_ms": 1e3 * t_full, "copy_ms": 1e3 * t_other,
            "speedup": t_full / t_other}


def parse_sizes(text: str) -> list[float]:
    sizes = [float(v) for v in text.split(",") if v.strip()]
    if not sizes or any(not (math.isfinite(v) and v > 0) for v in sizes):
        raise argparse.ArgumentTypeError(f"give positive megapixels, e.g. 0.25,1,4: {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=[0.25, 1, 4, 12, 24],
                   help="photo sizes in megapixels (square; default 0.25,1,4,12,24)")
    p.add_argument("--detect-size", type=positive_int, default=1024,
                   help="long side of the detection copy, px (default 1024)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs per stage after one warm-up; the fastest is kept")
    p.add_argument("--variants", action="store_true",
                   help="also compare today's path with the copy on the variant photos")
    p.add_argument("--variants-quick", action="store_true",
                   help="the comparison on the 0.5x and 1x photos only (a smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from clipinvert.align import FaceDetector

    detector = FaceDetector()
    base = astronaut()
    figures: dict[str, Any] = {"cpu": cpu_name(), "detect_size": args.detect_size,
                               "upsample": detector.upsample,
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                               "stages": [], "variants": []}
    print(f"# {figures['cpu']}; OMP_NUM_THREADS={figures['omp_num_threads']}; dlib upsample "
          f"{detector.upsample}; copy long side {args.detect_size}; fastest of {args.repeats}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="clipinvert-bench-align-") as tmp:
        for mp in args.sizes:
            side = max(16, round(math.sqrt(mp * 1e6)))
            photo = base.resize((side, side), LANCZOS)
            path = Path(tmp) / f"astronaut-{side}.jpg"
            photo.save(path, quality=95)
            row = stage_row(detector, photo, path, args.detect_size, args.repeats)
            figures["stages"].append(row)
            print(f"# {side}x{side} done", file=sys.stderr, flush=True)
    header = ["size", "MP", *[f"{s} ms" for s in STAGES], "total today ms",
              "total with copy ms", "speed-up"]
    rows = [[f"{r['size'][0]}x{r['size'][1]}", f"{r['megapixels']:.2f}",
             *[f"{r['ms'][s]:.1f}" for s in STAGES], f"{r['total_ms']:.0f}",
             f"{r['total_copy_ms']:.0f}", f"{r['speedup']:.1f}x"] for r in figures["stages"]]
    print(format_table(header, rows))
    print()
    rows = [[f"{r['size'][0]}x{r['size'][1]}", f"{r['megapixels']:.2f}",
             *[f"{r['ms_per_mp'][s]:.1f}" for s in STAGES]] for r in figures["stages"]]
    print(format_table(["size", "MP", *[f"{s} ms/MP" for s in STAGES]], rows))

    if args.variants or args.variants_quick:
        photos = variants(base, quick=args.variants_quick)
        results = [compare(detector, name, photo, args.detect_size, args.repeats)
                   for name, photo in photos.items()]
        if not args.variants_quick:
            big = photos["4x"]
            shifted = PIL.Image.new("RGB", (big.width + 1, big.height + 1), (128, 128, 128))
            shifted.paste(big, (1, 1))
            results.append(compare(detector, "4x shifted 1 px (today vs today)", shifted,
                                   args.detect_size, args.repeats, reference=(big, 1.0)))
        figures["variants"] = results
        print()
        header = ["variant", "size", "copy", "quad Δ px", "Δ/qsize", "crop max", "PSNR dB",
                  "detect ms", "copy ms", "speed-up"]
        rows = [[r["variant"], f"{r['size'][0]}x{r['size'][1]}",
                 "fell back" if r["fell_back"] else
                 (f"{r['copy_size'][0]}x{r['copy_size'][1]}" if r["copy_size"] else "-"),
                 f"{r['quad_delta_px']:.2f}", f"{100 * r['quad_delta_rel']:.2f}%",
                 str(r["crop_max_diff"]), f"{r['crop_psnr_db']:.1f}",
                 f"{r['detect_ms']:.0f}", f"{r['copy_ms']:.0f}", f"{r['speedup']:.1f}x"]
                for r in results]
        print(format_table(header, rows))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
