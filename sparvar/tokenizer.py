"""A small multi-scale tokenizer in VAR's style for the project's trained model (``small``).

VAR and Infinity quantise a VAE's latent map scale by scale: the residual between the latent and
what the earlier scales already give is averaged onto the next grid, quantised, and its codes,
resampled to the last grid, are added to the sum. The decoder maps the sum back to pixels. Here
the autoencoder is a fixed linear patch transform fitted to the training images:

- encode: ``p x p`` pixel patches -> centred -> projected on their ``d`` principal components ->
  each component divided by ``sqrt(its standard deviation) * scale``. The square root spreads
  the quantiser's fixed step over the components between leaving them raw (the first component,
  brightness, would take every step) and whitening them (the faint ones would take as many steps
  as the strong ones); it measured about 1 dB better than either on the training crops.
- quantise: Infinity's bit-wise codes (BSQ): per scale, the residual's sign bits; their codes
  ``+-1/sqrt(d)`` are summed exactly as ``InfinityNet`` sums the codes it generates
  (``accumulate_codes``), so a generated token sequence decodes like an encoded one.
- decode: the summed codes times the per-component weights, back through the components.

``fit`` chooses the components from the training crops and ``scale`` by the reconstruction error
there. A learned convolutional autoencoder would reconstruct better; this one has nothing to
train, and reconstruction fidelity is not what the project measures: the evaluation compares
images decoded from dense and sparse generations through the same decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .infinity_net import accumulate_codes

__all__ = ["PatchTokenizer"]


class PatchTokenizer(nn.Module):
    """Buffers: ``mean [3p^2]``, ``basis [3p^2, d]`` (orthonormal columns), ``weight [d]`` (the
    per-component divisor, ``scale`` included) and ``patch`` (the side ``p``, a 0-d tensor so that
    the state dict holds everything)."""

    def __init__(self, patch: int, codebook_dim: int):
        super().__init__()
        n = 3 * patch * patch
        if not 0 < codebook_dim <= n:
            raise ValueError(f"codebook_dim must be in [1, {n}] for {patch}x{patch} patches, got {codebook_dim}")
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("basis", torch.eye(n)[:, :codebook_dim].contiguous())
        self.register_buffer("weight", torch.ones(codebook_dim))
        self.register_buffer("patch", torch.tensor(patch))

    @property
    def codebook_dim(self) -> int:
        return self.basis.shape[1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> the latent map ``[N, d, H/p, W/p]`` before quantisation."""
        p = int(self.patch)
        N, _, H, W = images.shape
        if H % p or W % p:
            raise ValueError(f"image sides must be multiples of the patch {p}, got {H}x{W}")
        patches = F.unfold(images.float(), p, stride=p).transpose(1, 2)  # [N, hw, 3p^2]
        f = (patches - self.mean) @ self.basis / self.weight
        return f.transpose(1, 2).reshape(N, -1, H // p, W // p)

    def encode(self, images: torch.Tensor, grids) -> list[torch.Tensor]:
        """Multi-scale residual quantisation of ``images`` on ``grids`` (coarse to fine, the last
        one ``(H/p, W/p)``): per scale the bits ``[N, h*w, d]`` (0/1, float), the tokens an
        ``InfinityNet`` with this ``codebook_dim`` generates."""
        return self._quantise(images, grids)[0]

    def _quantise(self, images: torch.Tensor, grids) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``encode``'s bits and their summed codes ``[N, d, 1, h, w]``."""
        f = self.features(images)
        if tuple(grids[-1]) != tuple(f.shape[-2:]):
            raise ValueError(f"the last grid must be the latent map's {tuple(f.shape[-2:])}, got {tuple(grids[-1])}")
        d, carry, out = self.codebook_dim, None, []
        for hw in grids:
            residual = f if carry is None else f - carry.squeeze(2)
            r = F.interpolate(residual, size=tuple(hw), mode="area")
            bits = (r > 0).to(f.dtype).flatten(2).transpose(1, 2)
            out.append(bits)
            carry = accumulate_codes(carry, bits, tuple(hw), tuple(grids[-1]), d)
        return out, carry

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Summed codes ``[N, d, 1, h, w]`` (``GenerationResult.features``) or ``[N, d, h, w]`` ->
        images ``[N, 3, h*p, w*p]``, clamped to [0, 1]."""
        f = summed_codes.float()
        f = f.squeeze(2) if f.dim() == 5 else f
        N, d, h, w = f.shape
        p = int(self.patch)
        patches = (f.flatten(2).transpose(1, 2) * self.weight) @ self.basis.T + self.mean
        return F.fold(patches.transpose(1, 2), (h * p, w * p), p, stride=p).clamp(0, 1)

    def reconstruct(self, images: torch.Tensor, grids) -> torch.Tensor:
        """``decode`` of ``encode``: what the tokenizer keeps of ``images``."""
        return self.decode(self._quantise(images, grids)[1])

    @classmethod
    def fit(cls, images: torch.Tensor, patch: int, codebook_dim: int, grids,
            scales=(0.4, 0.6, 0.8, 1.0, 1.2, 1.6, 2.0)) -> tuple["PatchTokenizer", dict]:
        """Components from the patches of ``images`` ``[N, 3, H, W]`` (training crops), then the
        ``scales`` value whose reconstruction of ``images`` has the lowest mean squared error.
        Returns the tokenizer and ``{scale: PSNR dB}`` of every value tried."""
        tok = cls(patch, codebook_dim).to(images.device)
        patches = F.unfold(images.float(), patch, stride=patch).transpose(1, 2).reshape(-1, 3 * patch * patch)
        mean = patches.mean(0)
        _, s, vh = torch.linalg.svd(patches - mean, full_matrices=False)
        std = s[:codebook_dim] / (patches.shape[0] - 1) ** 0.5
        tok.mean.copy_(mean)
        tok.basis.copy_(vh[:codebook_dim].T)
        tried = {}
        for scale in scales:
            tok.weight.copy_(std.sqrt() * scale)
            mse = (tok.reconstruct(images, grids) - images.float()).pow(2).mean().item()
            tried[scale] = 10 * torch.log10(torch.tensor(1 / max(mse, 1e-12))).item()
        tok.weight.copy_(std.sqrt() * max(tried, key=tried.get))
        return tok, tried
