"""Loading the released layouts, and one clear exit-3 line for every kind of bad file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clipinvert.checkpoints import (
    load_clipinverter,
    load_e4e,
    load_stylegan2,
    read_checkpoint,
)
from clipinvert.errors import WeightsError
from clipinvert.testing.models import (
    tiny_config,
    write_clipinverter,
    write_e4e,
    write_stylegan2,
)

CFG = tiny_config(32, 64, 32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return {
        # Narrow encoders: the layouts are the released ones, the widths are read from the keys
        # (the released widths are checked on meta tensors in test_nets.py).
        "e4e": write_e4e(d / "e4e.pt", CFG, encoder="tiny"),
        "e4e_single": write_e4e(d / "e4e1.pt", CFG, latent_avg="single", drop_kernels=True,
                                encoder="tiny"),
        "ci": write_clipinverter(d / "ci.pt", CFG, encoder="tiny"),
        "ci_mapper": write_clipinverter(d / "ci_old.pt", CFG, prefix="mapper.", encoder="tiny"),
        "stage1": write_clipinverter(d / "stage1.pt", CFG, remapper=False, encoder="tiny"),
        "sg": write_stylegan2(d / "sg.pt", CFG),
        "sg_train": write_stylegan2(d / "sg_train.pt", CFG, training=True),
    }


def test_e4e_layout_and_latent_avg_variants(files: dict[str, Path]) -> None:
    full = load_e4e(files["e4e"])
    single = load_e4e(files["e4e_single"])  # (512)-style latent_avg, kernels dropped
    assert full.encoder.n_styles == 8 and full.latent_avg.shape == (8, 64)
    assert single.latent_avg.shape == (8, 64)
    torch.testing.assert_close(single.latent_avg[0], single.latent_avg[-1])
    from clipinvert.nets import Generator

    assert full.decoder_sd.keys() == Generator(CFG).state_dict().keys()
    assert not full.encoder.training


def test_clipinverter_adapter_and_mapper_prefixes(files: dict[str, Path]) -> None:
    new, old = load_clipinverter(files["ci"]), load_clipinverter(files["ci_mapper"])
    assert new.decoder.has_remapper and old.decoder.has_remapper
    for a, b in zip(new.adapter.state_dict().values(), old.adapter.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b)
    stage1 = load_clipinverter(files["stage1"])
    assert not stage1.decoder.has_remapper


def test_stylegan2_files(files: dict[str, Path]) -> None:
    g, avg = load_stylegan2(files["sg"])
    assert g.size == 32 and avg.shape == (64,)
    g2, avg2 = load_stylegan2(files["sg_train"])  # argparse.Namespace allow-listed
    assert avg2.shape == (64,) and torch.isfinite(avg2).all()


def test_missing_kernel_buffers_are_recomputed(files: dict[str, Path]) -> None:
    sd = read_checkpoint(files["e4e_single"])["state_dict"]
    assert not any(k.endswith("blur.kernel") for k in sd)
    from clipinvert.checkpoints import build_generator, sub_state_dict

    g = build_generator(sub_state_dict(sd, "decoder."), "test", files["e4e_single"])
    assert float(g.convs[0].conv.blur.kernel.sum()) == pytest.approx(4.0)


@pytest.mark.parametrize("case", ["missing", "empty", "html", "truncated", "random", "dir",
                                  "list", "no_state_dict"])
def test_bad_files_give_one_line(case: str, tmp_path: Path, files: dict[str, Path]) -> None:
    p = tmp_path / "bad.pt"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "html":
        p.write_text("<!DOCTYPE html><html><title>Google Drive - quota exceeded</title>")
    elif case == "truncated":
        data = files["ci"].read_bytes()
        p.write_bytes(data[: len(data) // 3])
    elif case == "random":
        p.write_bytes(os.urandom(4096))
    elif case == "dir":
        p.mkdir()
    elif case == "list":
        torch.save([torch.zeros(1)], p)
    elif case == "no_state_dict":
        torch.save({"foo": torch.zeros(1)}, p)
    with pytest.raises(WeightsError) as err:
        load_e4e(p)
    msg = str(err.value)
    assert "\n" not in msg and str(p) in msg
    if case == "html":
        assert "HTML page" in msg
    if case == "truncated":
        assert "truncated" in msg


def test_swapped_files_are_named(files: dict[str, Path]) -> None:
    with pytest.raises(WeightsError, match="e4e"):
        load_clipinverter(files["e4e"])
    with pytest.raises(WeightsError, match="no encoder"):
        load_e4e(files["ci"])
    with pytest.raises(WeightsError, match="g_ema"):
        load_stylegan2(files["e4e"])


def test_wrong_shapes_and_keys(files: dict[str, Path], tmp_path: Path) -> None:
    ckpt = read_checkpoint(files["ci"])
    sd = ckpt["state_dict"]
    sd["adapter.coarse_mapping.modulation_module_list.0.conv.weight"] = torch.zeros(3, 3, 3, 3)
    sd["adapter.extra.weight"] = torch.zeros(1)
    del sd["adapter.fine_mapping.modulation_module_list.0.norm.bias"]
    p = tmp_path / "wrong.pt"
    torch.save(ckpt, p)
    with pytest.raises(WeightsError) as err:
        load_clipinverter(p)
    msg = str(err.value)
    assert "1 missing" in msg and "1 unexpected" in msg and "1 wrong shapes" in msg
    assert "\n" not in msg


def test_code_in_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, p)
    with pytest.raises(WeightsError, match="refused"):
        load_e4e(p)
    assert not marker.exists()
