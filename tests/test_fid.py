"""FID: pytorch-fid's Inception without a download, its weight file, and the Fréchet distance.

Fidelity is shown against pytorch-fid itself: the reference network is pytorch-fid's own
``InceptionV3([3])`` (its weight download patched to hand over our random file) and the
reference features come from pytorch-fid's own ``get_activations`` on PNG files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid.inception import FID_WEIGHTS_URL
from scipy import linalg

from clipinvert.checkpoints import load_inception
from clipinvert.errors import WeightsError
from clipinvert.evaluation.fid import (
    FIDStatistics,
    InceptionFeatures,
    fid_statistics,
    frechet_distance,
    small_set_warning,
)
from clipinvert.nets.inception import FID_DIMS, FIDInceptionV3
from clipinvert.testing.models import write_alexnet_trunk, write_inception

FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_inception(tmp_path_factory.mktemp("fid") / FILE_NAME)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four 64×48 RGB images (not square: the 299×299 resize is exercised)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("fid-images")
    paths = []
    for i in range(4):
        x = np.linspace(0, 255, 64)[None, :, None] * rng.uniform(0.2, 1, (1, 1, 3))
        pixels = np.clip(x + rng.normal(0, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


# ---- the network ----------------------------------------------------------------------------

def test_features_equal_pytorch_fid_end_to_end(inception_file: Path, pngs: list[Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Same weights, same PNGs: pytorch-fid's get_activations (PIL → ToTensor → its
    InceptionV3 → float64) and ours (load_inception → InceptionFeatures.from_pil) agree
    exactly, and so do the bare networks on a tensor batch."""
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import get_activations

    sd = torch.load(inception_file, weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
    reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIMS]]).eval()
    expected = get_activations([str(p) for p in pngs], reference, batch_size=len(pngs),
                               dims=FID_DIMS, device="cpu", num_workers=0)

    ours = InceptionFeatures.from_file(inception_file, device="cpu")
    got = ours.from_pil(Image.open(p) for p in pngs)
    assert got.dtype == np.float64 and got.shape == (len(pngs), FID_DIMS)
    np.testing.assert_array_equal(got, expected)
    # Not trivially equal: finite, of order one, and different for different images.
    assert np.isfinite(got).all()
    assert 1e-2 < np.abs(got).mean() < 1e2
    assert np.std(got, axis=0).mean() > 1e-3 * np.abs(got).mean()

    images = torch.rand(2, 3, 40, 70, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference(images)[0].squeeze(3).squeeze(2)
        assert torch.equal(ours.net(images), ref)


def test_network_refuses_bad_shapes() -> None:
    with torch.device("meta"):
        net = FIDInceptionV3()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.zeros(3, 8, 8, device="meta"))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.zeros(1, 4, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="float"):
        net(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device="meta"))


class _MeanNet(torch.nn.Module):
    """A stand-in feature network: each image's mean, repeated 2048 times."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None].expand(-1, FID_DIMS)


def test_features_check_input_and_batch_mixed_sizes() -> None:
    feats = InceptionFeatures(_MeanNet(), batch_size=2)
    with pytest.raises(ValueError, match="shape"):
        feats(torch.zeros(2, 64, 64))
    with pytest.raises(ValueError, match="float"):
        feats(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        feats(torch.full((2, 3, 8, 8), 255.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        feats(torch.full((2, 3, 8, 8), -1.0))
    values = [0, 51, 102, 153, 204]
    sizes = [(8, 8), (8, 8), (8, 8), (16, 4), (8, 8)]  # a size change and a full batch
    images = [Image.new("L" if i == 1 else "RGB", s, (v if i == 1 else (v, v, v)))
              for i, (v, s) in enumerate(zip(values, sizes, strict=True))]
    out = feats.from_pil(images)
    assert out.dtype == np.float64 and out.shape == (5, FID_DIMS)
    np.testing.assert_allclose(out[:, 0], np.array(values) / 255, rtol=1e-6)
    assert feats.from_pil([]).shape == (0, FID_DIMS)


# ---- the weight file ------------------------------------------------------------------------

def test_loader_reads_the_released_layout(inception_file: Path, tmp_path: Path) -> None:
    net = load_inception(inception_file)
    assert isinstance(net, FIDInceptionV3) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    sd = torch.load(inception_file, weights_only=True)
    assert sd["fc.weight"].shape == (1008, 2048) and "AuxLogits.fc.weight" not in sd
    assert set(sd) == set(net.state_dict())
    # Files written before PyTorch 0.4.1 carry no num_batches_tracked: filled in.
    old = tmp_path / "old.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, old)
    old_net = load_inception(old)
    assert torch.equal(old_net.Mixed_7c.branch_pool.bn.running_var,
                       net.Mixed_7c.branch_pool.bn.running_var)


def _one_line(err: pytest.ExceptionInfo[WeightsError], path: Path) -> str:
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_loader_refuses_wrong_files(inception_file: Path, tmp_path: Path) -> None:
    alexnet = write_alexnet_trunk(tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(WeightsError) as err:
        load_inception(alexnet)
    assert "Conv2d_1a_3x3" in _one_line(err, alexnet) and FILE_NAME in str(err.value)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(inception_file.read_bytes()[: 1 << 20])
    with pytest.raises(WeightsError) as err:
        load_inception(truncated)
    _one_line(err, truncated)

    # torchvision's ImageNet Inception: the same names plus AuxLogits.*, 1000 classes.
    tv = tmp_path / "inception_v3_google.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3),
                "Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 1, 1),
                "AuxLogits.fc.weight": torch.zeros(1000, 768),
                "fc.weight": torch.zeros(1000, 2048)}, tv)
    with pytest.raises(WeightsError) as err:
        load_inception(tv)
    msg = _one_line(err, tv)
    assert "missing keys" in msg and "AuxLogits" in msg and "not the FID network" in msg



def test_registry_names_the_fid_weights() -> None:
    from clipinvert.registry import EDIT_ROLES, WEIGHT_ROLES, Registry

    assert "inception" in WEIGHT_ROLES and "inception" not in EDIT_ROLES
    reg = Registry.load(user=False)
    entry = reg.weights["inception-fid"]
    assert entry.file == FILE_NAME
    assert entry.urls == (FID_WEIGHTS_URL,)  # pytorch-fid's own download address
    assert FID_WEIGHTS_URL.endswith("/" + FILE_NAME)
    for name in ("faces", "cats", "birds"):
        assert reg.domain(name).weights["inception"] == "inception-fid"


# ---- the Fréchet distance -------------------------------------------------------------------

def _features(seed: int, n: int = 200, dims: int = 16, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    return rng.normal(size=(n, dims)) @ mix + shift


def _independent_fid(x: np.ndarray, y: np.ndarray) -> float:
    """‖μx − μy‖² + Tr(Σx + Σy − 2·sqrtm(Σx Σy)), written out here with numpy and scipy."""
    mx, my = x.mean(axis=0), y.mean(axis=0)
    cx = (x - mx).T @ (x - mx) / (len(x) - 1)
    cy = (y - my).T @ (y - my) / (len(y) - 1)
    root = linalg.sqrtm(cx @ cy)
    return float(np.sum((mx - my) ** 2) + np.trace(cx) + np.trace(cy)
                 - 2 * np.trace(root).real)


def test_statistics_are_pytorch_fids() -> None:
    x = _features(0).astype(np.float32)
    stats = fid_statistics(x)
    assert isinstance(stats, FIDStatistics) and stats.n == 200
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    assert stats.mu.shape == (16,) and stats.sigma.shape == (16, 16)
    np.testing.assert_array_equal(stats.sigma, np.cov(x.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        fid_statistics(x[:1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fid_statistics(x[0])


def test_frechet_distance_maths() -> None:
    x, y = _features(1), _features(2, shift=0.3)
    a, b = fid_statistics(x), fid_statistics(y)
    fid = frechet_distance(a, b)
    assert isinstance(fid, float) and fid > 0
    # Tolerances: Σ here is well conditioned (200 samples, 16 dims, traces ~16), so sqrtm's
    # relative error is a few ulps times the condition number: 1e-9 relative is ample, and
    # ~1e-10 absolute for the identical-set case (where Tr Σa + Tr Σb ≈ 2 Tr sqrtm(Σa Σa)).
    scale = np.trace(a.sigma) + np.trace(b.sigma)
    assert abs(frechet_distance(a, a)) < 1e-10 * scale
    assert frechet_distance(b, a) == pytest.approx(fid, rel=1e-9)
    assert fid == pytest.approx(_independent_fid(x, y), rel=1e-9)
    # A case with a closed form: diagonal covariances, FID = ‖Δμ‖² + Σ (√a − √b)².
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu_a, mu_b = np.zeros(3), np.array([1.0, 2.0, 0.0])
    assert frechet_distance((mu_a, np.diag(va)), (mu_b, np.diag(vb))) == pytest.approx(
        5.0 + 1.0 + 1.0, rel=1e-12)
    with pytest.raises(ValueError, match="differ in size"):
        frechet_distance(a, fid_statistics(_features(3, dims=8)))
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        frechet_distance(a, (b.mu, b.sigma[:4]))


def test_small_sets_warn_but_still_give_a_value() -> None:
    assert small_set_warning(2049, 5000) is None
    line = small_set_warning(100, 5000)
    assert line is not None and "\n" not in line and "100" in line and "2048" in line
    assert small_set_warning(5000, 2048) is not None  # rank ≤ N − 1 < 2048
    assert small_set_warning(10, 10, dims=16) is not None
    x, y = _features(4, n=10), _features(5, n=10, shift=0.3)
    assert np.isfinite(frechet_distance(fid_statistics(x), fid_statistics(y), notes=[]))


def test_pytorch_fid_prints_become_notes(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from pytorch_fid import fid_score

    def noisy(*args: object, **kwargs: object) -> float:
        print("fid calculation produces singular product; adding 1e-06 to diagonal")
        return 3.0

    monkeypatch.setattr(fid_score, "calculate_frechet_distance", noisy)
    stats = (np.zeros(2), np.eye(2))
    notes: list[str] = []
    assert frechet_distance(stats, stats, notes=notes) == 3.0
    assert notes == ["pytorch-fid: fid calculation produces singular product; adding 1e-06 "
                     "to diagonal"]
    frechet_distance(stats, stats)
    out, err = capsys.readouterr()
    assert out == "" and "singular product" in err


# ---- the metric ---------------------------------------------------------------------------

def _metric_batches(pairs: list, inputs: list[Image.Image], outputs: list[Image.Image]):
    from clipinvert.evaluation.metrics import Batch

    blank = torch.zeros(len(pairs), 3, 8, 8)
    return Batch(pairs=pairs, index=list(range(len(pairs))), inputs=blank, outputs=blank,
                 output_images=outputs, input_images=inputs)


def test_fid_metric_reference_crops_small_sets_and_cached_notes(
        inception_file: Path, pngs: list[Path], tmp_path: Path) -> None:
    from types import SimpleNamespace

    from clipinvert.evaluation.metrics import EvalOptions
    from clipinvert.evaluation.metrics.fid import FID
    from clipinvert.evaluation.pairs import Pair

    class Colours:
        """6-d features (channel means and deviations): the metric's bookkeeping is under test,
        not Inception (above), and 2048² square roots would take a minute."""

        def from_pil(self, ims: list[Image.Image]) -> np.ndarray:
            arr = [np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3) for im in ims]
            return np.array([np.r_[a.mean(0), a.std(0)] for a in arr])

    net = Colours()
    networks = SimpleNamespace(inception=net, files={"inception": inception_file})
    images = [Image.open(p).convert("RGB") for p in pngs]
    # A run that aligned its inputs: the reference is the crops it saw, not the photos.
    crops = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    pairs = [Pair(pngs[i], pngs[(i + 1) % 4], "p", transform=tmp_path / f"{i}.json")
             for i in range(4)]
    fid = FID(EvalOptions(), networks)
    fid.update(_metric_batches(pairs[:3], crops[:3], images[1:4]))
    fid.update(_metric_batches(pairs[3:], crops[3:], images[:1]))
    result = fid.result()
    expect = frechet_distance(fid_statistics(net.from_pil(images[1:] + images[:1])),
                              fid_statistics(net.from_pil(crops)))
    assert result.value == pytest.approx(expect, rel=1e-9)
    assert result.details == {"reference": "inputs (aligned crops)", "reference_count": 4}
    # One output has no covariance: no value, one note, no exception.
    one = FID(EvalOptions(), networks)
    one.update(_metric_batches([Pair(pngs[0], pngs[1])], images[:1], images[1:2]))
    single = one.result()
    assert single.value is None and single.notes == [
        "FID not computed: FID needs at least 2 images per set, got 1"]
    # An unreadable reference image is named on every run, the cached one too.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    for _ in range(2):
        fid = FID(EvalOptions(), networks, reference=[*pngs, broken])
        fid.update(_metric_batches(pairs, crops, images))
        result = fid.result()
        assert result.details["reference"] == "reference set"
        assert result.details["reference_count"] == 4
        assert any(n.startswith(f"FID reference {broken}") for n in result.notes)
