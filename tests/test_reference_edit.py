"""The edit equals docs/forward-pass.md, checked against an independent computation.

The reference below works straight from the checkpoint files' state dicts with plain tensor
maths — per-sample modulated weights with grouped convolutions (the released formulation),
zero-insertion upsampling by transposed convolution, hand-written adapter and remapper — so it
shares no code with :mod:`clipinvert.nets` beyond the e4e body (plain torch modules).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipinvert.checkpoints import read_checkpoint, sub_state_dict

SQ2 = math.sqrt(2)


def _eq_linear(x, w, b, lr_mul=1.0):
    return F.linear(x, w * (lr_mul / math.sqrt(w.shape[1])), None if b is None else b * lr_mul)


def _modconv(sd, p, x, style, demod=True, up=False):
    weight = sd[p + "conv.weight"]
    _, out_c, in_c, k, _ = weight.shape
    b = x.shape[0]
    s = _eq_linear(style, sd[p + "conv.modulation.weight"], sd[p + "conv.modulation.bias"])
    w = weight / math.sqrt(in_c * k * k) * s.view(b, 1, in_c, 1, 1)
    if demod:
        w = w * torch.rsqrt(w.pow(2).sum([2, 3, 4]) + 1e-8).view(b, out_c, 1, 1, 1)
    h = x.shape[-1]
    if up:
        wt = w.transpose(1, 2).reshape(b * in_c, out_c, k, k)
        y = F.conv_transpose2d(x.reshape(1, b * in_c, h, h), wt, stride=2, groups=b)
        y = y.reshape(b, out_c, *y.shape[-2:])
        kern = torch.tensor([1.0, 3, 3, 1])
        kern = (kern[:, None] * kern[None]) / 64 * 4
        y = F.conv2d(F.pad(y, [1, 1, 1, 1]), kern.expand(out_c, 1, 4, 4), groups=out_c)
        return y
    y = F.conv2d(x.reshape(1, b * in_c, h, h), w.reshape(b * out_c, in_c, k, k),
                 padding=k // 2, groups=b)
    return y.reshape(b, out_c, h, h)


def _styled(sd, p, x, style, noise, up=False):
    y = _modconv(sd, p, x, style, up=up)
    y = y + sd[p + "noise.weight"] * noise
    return F.leaky_relu(y + sd[p + "activate.bias"].view(1, -1, 1, 1), 0.2) * SQ2


def _upsample_rgb(skip):
    c = skip.shape[1]
    kern = torch.tensor([1.0, 3, 3, 1])
    kern = (kern[:, None] * kern[None]) / 64 * 4
    y = F.conv_transpose2d(skip, kern.expand(c, 1, 4, 4), stride=2, groups=c)
    return y[:, :, 1:-1, 1:-1]


def _to_rgb(sd, p, x, style, skip=None):
    y = _modconv(sd, p, x, style, demod=False) + sd[p + "bias"]
    return y if skip is None else y + _upsample_rgb(skip)


def _remap_mlp(sd, j, t):
    p = f"affine_mlps.{j}."
    h = F.relu(F.linear(t, sd[p + "0.weight"], sd[p + "0.bias"]))
    h = F.linear(h, sd[p + "2.weight"], sd[p + "2.bias"])
    h = F.relu(F.layer_norm(h, h.shape[-1:], sd[p + "3.weight"], sd[p + "3.bias"]))
    return F.linear(h, sd[p + "5.weight"], sd[p + "5.bias"])


def reference_decode(sd, w_hat, t=None):
    n_rgb = sum(1 for k in sd if k.startswith("to_rgbs.") and k.endswith("conv.weight"))
    b = w_hat.shape[0]
    noise = [sd[f"noises.noise_{j}"] for j in range(2 * n_rgb + 1)]

    def conv_latent(j):  # latent of convs[j-1], W+ index j
        if t is None:
            return w_hat[:, j]
        lam = 0.9 * sd[f"lambdas.{j - 1}"]
        return (1 - lam) * w_hat[:, j] + lam * _remap_mlp(sd, j - 1, t)

    x = sd["input.input"].repeat(b, 1, 1, 1)
    x = _styled(sd, "conv1.", x, w_hat[:, 0], noise[0])
    skip = _to_rgb(sd, "to_rgb1.", x, w_hat[:, 1])
    for k in range(n_rgb):
        x = _styled(sd, f"convs.{2 * k}.", x, conv_latent(2 * k + 1), noise[2 * k + 1], up=True)
        x = _styled(sd, f"convs.{2 * k + 1}.", x, conv_latent(2 * k + 2), noise[2 * k + 2])
        skip = _to_rgb(sd, f"to_rgbs.{k}.", x, w_hat[:, 2 * k + 3], skip)
    return skip


def _pixelnorm(x):
    return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-8)


def _film(sd, p, t):
    h = F.linear(t, sd[p + "0.weight"], sd[p + "0.bias"])
    h = F.leaky_relu(F.layer_norm(h, h.shape[-1:], sd[p + "1.weight"], sd[p + "1.bias"]), 0.01)
    return F.linear(h, sd[p + "3.weight"], sd[p + "3.bias"])


def reference_adapter(sd, name, x, t):
    p = f"{name}.modulation_module_list.0."
    x = _pixelnorm(x)
    y = F.conv2d(x, sd[p + "conv.weight"], padding=1)
    y = F.group_norm(y, 32, sd[p + "norm.weight"], sd[p + "norm.bias"])
    gamma = _film(sd, p + "gamma_function.", t)[:, :, None, None]
    beta = _film(sd, p + "beta_function.", t)[:, :, None, None]
    return F.leaky_relu(y * (1 + torch.exp(gamma)) + beta, 0.01)


def test_edit_matches_independent_reference(editor, tiny_models, face_crop) -> None:
    root = tiny_models.parent
    ci = read_checkpoint(root / "clipinverter.pt")["state_dict"]
    e4e_ckpt = read_checkpoint(root / "e4e.pt")
    dec_sd = sub_state_dict(ci, "decoder.")
    ad_sd = sub_state_dict(ci, "adapter.")
    prompt = "she has wavy blond hair"

    with torch.no_grad():
        x = editor.preprocess([face_crop, face_crop.transpose(0)])
        enc = editor.e4e.encoder
        c1, c2, c3 = enc.forward_features(x)
        w = enc.forward_styles(c1, c2, c3) + e4e_ckpt["latent_avg"]  # start_from_latent_avg
        t = editor.embed_text([prompt]).expand(2, -1)
        mod = (reference_adapter(ad_sd, "fine_mapping", c1, t),
               reference_adapter(ad_sd, "medium_mapping", c2, t),
               reference_adapter(ad_sd, "coarse_mapping", c3, t))
        delta = enc.forward_styles(*mod)
        w_hat = w + 0.1 * delta
        expected = reference_decode(dec_sd, w_hat, t)
        expected_inv = reference_decode(dec_sd, w)

    result = editor.edit([face_crop, face_crop.transpose(0)], prompt)
    torch.testing.assert_close(result.latents, w_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.images, expected, atol=2e-4, rtol=1e-4)
    inv = editor.invert([face_crop, face_crop.transpose(0)])
    torch.testing.assert_close(inv.latents, w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inv.images, expected_inv, atol=2e-4, rtol=1e-4)
    # The edit really edits: the remapper and Δ change the picture.
    assert (result.images - inv.images).abs().mean() > 1e-3
