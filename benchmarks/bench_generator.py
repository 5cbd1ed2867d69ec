"""Which formulation of the StyleGAN2 decode is fastest, per device, dtype and batch size.

Why this exists: the editor's generator can run its modulated convolutions two ways with the
same maths (:class:`clipinvert.nets.stylegan2.ModulatedConv2d`): per-sample weights in one
grouped convolution (``fused``, as released), or modulated activations through one ordinary
convolution (``unfused``, optionally channels-last).  Which wins depends on the device, the
dtype and the batch, so the choice is made from this script's figures (docs/performance.md),
never guessed.  It times the full-width generator with the CLIPRemapper (random weights, the
released shapes) decoding random latents, and prints per formulation:

* milliseconds per batch and images per second (synchronised wall clock, median of the
  repeats);
* peak memory per batch (CUDA; with ``--cudnn-benchmark`` it includes the autotuner's
  trial workspaces, so read the memory from a run without it);
* the largest difference from the float32 fused decode of the same latents, in 8-bit grey
  levels, and the PSNR in dB against it (lower precisions must stay ≥ 40 dB);
* with ``--graphs``, the same decode replayed from a captured CUDA graph (launch overhead);
* with ``--compile``, ``torch.compile`` of the decode (compile time and steady state).

Examples::

    python benchmarks/bench_generator.py --device cuda                  # 1024 px, all forms
    python benchmarks/bench_generator.py --device cuda --dtypes float16 --batch-sizes 1,8,32
    python benchmarks/bench_generator.py --device cpu --size 256 --batch-sizes 1,4
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from benchcommon import Clock, device_meta, format_table, positive_int, psnr_8bit

from clipinvert.nets import Generator, GeneratorConfig
from clipinvert.nets.stylegan2 import FORMULATIONS as FORMS
from clipinvert.pipeline import DTYPES, resolve_device, resolve_dtype
from clipinvert.runtime import tune_allocator
from clipinvert.testing.models import make_generator

TEXT_DIM = 512


def median_time(device: torch.device, fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    clock = Clock(device)
    return statistics.median(clock.time(fn)[0] for _ in range(repeats))


def latents(g: Generator, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W+ latents from the mapping network (a realistic range, unlike raw normal noise) and
    unit-norm text embeddings, as CLIP gives; seeded, on the CPU, in float32."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = g.mapping(torch.randn(batch * g.n_latent, g.style_dim, generator=gen))
    text = torch.nn.functional.normalize(torch.randn(batch, TEXT_DIM, generator=gen), dim=-1)
    return w.view(batch, g.n_latent, g.style_dim), text


def grey_levels(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(largest difference in 8-bit grey levels, PSNR in dB) of two [-1, 1] batches, compared
    as the saved pictures are: clamped and quantised."""
    a = ((out.float().clamp(-1, 1) + 1) * 127.5).round()
    b = ((ref.float().clamp(-1, 1) + 1) * 127.5).round()
    return float((a - b).abs().max()), psnr_8bit(float((a - b).square().mean()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    forms = [f.strip() for f in args.forms.split(",")]
    if unknown := [f for f in forms if f not in FORMS]:
        raise SystemExit(f"unknown --forms {unknown}; choose from {list(FORMS)}")
    device = resolve_device(args.device)
    dtypes = [resolve_dtype(d, device) for d in args.dtypes.split(",")]
    if device.type == "cuda":
        # off unless asked, as in the editor (docs/performance.md#batch-size-auto)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    base = make_generator(GeneratorConfig(size=args.size, text_dim=TEXT_DIM), seed=0)
    ref_batch = max(args.batch_sizes)
    w_all, text_all = latents(base, ref_batch, seed=1)
    with torch.no_grad():
        g32 = copy.deepcopy(base).to(device).set_formulation("fused")
        reference = g32(w_all.to(device), text_all.to(device)).cpu()  # float32, fused
    del g32
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        # each dtype from the float32 weights (not float16 → bfloat16, which rounds twice)
        g = copy.deepcopy(base).to(device=device, dtype=dtype)
        for form in forms:
            g.set_formulation(form)
            for batch in args.batch_sizes:
                w = w_all[:batch].to(device, dtype)
                text = text_all[:batch].to(device, dtype)
                row: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "form": form,
                                       "batch": batch}
                try:
                    row.update(measure(g, w, text, reference[:batch], device, args))
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                    torch.cuda.empty_cache()
                rows.append(row)
                print(describe(row), file=sys.stderr, flush=True)
                save_json(args.json, {"meta": meta(device, args), "rows": rows})  # so far
    return {"meta": meta(device, args), "rows": rows}


def save_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def measure(g: Generator, w: torch.Tensor, text: torch.Tensor, reference: torch.Tensor,
            device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    batch = len(w)
    cuda = device.type == "cuda"

    def decode() -> torch.Tensor:
        with torch.no_grad():
            return g(w, text)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_time(device, decode, args.warmup, args.repeats)
    out: dict[str, Any] = {"ms_per_batch": seconds * 1000, "images_per_s": batch / seconds}
    if cuda:
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["max_grey_diff"], out["psnr_db"] = grey_levels(decode().cpu(), reference)
    if args.graphs and cuda:
        out["graph_ms_per_batch"] = graph_time(decode, device, args) * 1000
    if args.compile:
        out.update(compile_time(g, w, text, device, args))
    return out


def graph_time(decode: Callable[[], torch.Tensor], device: torch.device,
               args: argparse.Namespace) -> float:
    """The same decode captured once as a CUDA graph and replayed: what launch overhead costs."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture (cuDNN picks its algorithms)
            decode()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode()
    return median_time(device, graph.replay, args.warmup, args.repeats)


def compile_time(g: Generator, w: torch.Tensor, text: torch.Tensor, device: torch.device,
                 args: argparse.Namespace) -> dict[str, float]:
    compiled = torch.compile(g)
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(w, text)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0

    def decode() -> None:
        with torch.no_grad():
            compiled(w, text)

    return {"compile_s": first,
            "compiled_ms_per_batch": median_time(device, decode, args.warmup, args.repeats) * 1000}


def meta(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    return {
        **device_meta(device),
        "size": args.size,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "cudnn_benchmark": args.cudnn_benchmark,
    }


def describe(row: dict[str, Any]) -> str:
    head = f"{row['dtype']:>8} {row['form']:>10} B={row['batch']:<3}"
    if "error" in row:
        return f"{head} {row['error']}"
    text = (f"{head} {row['ms_per_batch']:9.2f} ms/batch {row['images_per_s']:8.2f} img/s "
            f"max diff {row['max_grey_diff']:.0f} grey, PSNR {row['psnr_db']:.1f} dB")
    if "peak_mib" in row:
        text += f", peak {row['peak_mib']:.0f} MiB"
    return text


def table(result: dict[str, Any]) -> str:
    m = result["meta"]
    extra = [k for k in ("graph_ms_per_batch", "compiled_ms_per_batch", "compile_s")
             if any(k in r for r in result["rows"])]
    header = ["dtype", "form", "B", "ms/batch", "img/s", "ms/img", "peak MiB", "MiB/img",
              "max diff (grey)", "PSNR dB", *extra]
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["dtype"], r["form"], str(r["batch"]), r["error"],
                         *[""] * (len(header) - 4)])
            continue
        peak = r.get("peak_mib")
        rows.append([
            r["dtype"], r["form"], str(r["batch"]), f"{r['ms_per_batch']:.2f}",
            f"{r['images_per_s']:.1f}", f"{r['ms_per_batch'] / r['batch']:.2f}",
            "" if peak is None else f"{peak:.0f}",
            "" if peak is None else f"{peak / r['batch']:.0f}",
            f"{r['max_grey_diff']:.0f}", f"{r['psnr_db']:.1f}",
            *(f"{r[k]:.2f}" if k in r else "" for k in extra)])
    return "\n".join([
        f"generator decode (StyleGAN2 {m['size']} px + CLIPRemapper, random weights): "
        f"{m['device']} ({m['device_name']}), torch {m['torch']}, {m['warmup']} warm-up + "
        f"{m['repeats']} timed, median, cuDNN benchmark {m['cudnn_benchmark']}; "
        "differences against float32 fused",
        "", format_table(["dtype", *header[1:]], rows)])


def batch_sizes(text: str) -> tuple[int, ...]:
    return tuple(positive_int(s) for s in text.split(",") if s.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--size", type=int, choices=(256, 512, 1024), default=1024)
    p.add_argument("--dtypes", default="float32,float16,bfloat16",
                   help=f"comma-separated, of {list(DTYPES)} (float16: CUDA only)")
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {list(FORMS)}")
    p.add_argument("--batch-sizes", type=batch_sizes, default=(1, 8, 32))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="turn cuDNN's autotuner on (off by default, as in the editor)")
    p.add_argument("--graphs", action="store_true", help="also time CUDA-graph replay")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()
    result = run(args)
    print(table(result))
    save_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
