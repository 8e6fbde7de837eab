"""Perceiver resampler (Flamingo; KOSMOS-1's connector): latent queries that read the image tokens.

``M`` learned latents cross-attend to the image tokens and come out as ``M`` language-model
embeddings, whatever the number ``N`` of image tokens:

* the image tokens are projected ``Dv → W`` (plus a learned position embedding over the media tokens
  when ``max_media_tokens`` is set);
* each of ``depth`` layers is pre-LN and residual on the latents: cross-attention whose queries are the
  latents and whose keys/values are ``[image tokens; latents]`` (Flamingo, so the latents also read each
  other), then a GELU FFN;
* a final LayerNorm and ``Linear(W, out_dim)``.

The internal width is ``W = num_heads * head_dim``: the resampler's cost does not grow with the
language model's width (4096 for a 7B LM) or the encoder's, and attention needs no extra projection
between the residual stream and the heads. ``out_dim`` is only the last projection's output.

Shape legend: B batch, N image tokens, Dv image width, M latents, W internal width, D out width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResamplerAttention(nn.Module):
    """Pre-LN cross-attention of the latents to ``[media; latents]`` (Flamingo's ``PerceiverAttention``).

    ``media [B, N, W]``, ``latents [B, M, W]``, bool ``mask [B, N]`` (True = real token) → update
    ``[B, M, W]`` to add to the latents (the caller adds the residual).
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, W]`` → ``[B, heads, L, W / heads]``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``media [B, N, W]``, ``latents [B, M, W]``, ``mask [B, N]`` or ``None`` → ``[B, M, W]``."""
        latents = self.norm_latents(latents)
        context = torch.cat([self.norm_media(media), latents], dim=1)
        k, v = self.kv(context).chunk(2, dim=-1)
        attn_mask = None
        if mask is not None:  # the latents are always visible, so no query row is fully masked
            keep = torch.ones(mask.shape[0], latents.shape[1], dtype=torch.bool, device=mask.device)
            attn_mask = torch.cat([mask, keep], dim=1)[:, None, None, :]
        attended = F.scaled_dot_product_attention(self._heads(self.q(latents)), self._heads(k), self._heads(v),
                                                  attn_mask=attn_mask)
        return self.out(attended.transpose(1, 2).flatten(2))


class ResamplerFeedForward(nn.Sequential):
    """Pre-LN GELU FFN: ``LayerNorm → Linear(W, mult·W) → GELU → Linear(mult·W, W)``, ``[B, M, W]`` → same."""

    def __init__(self, width: int, mult: int) -> None:
        super().__init__(nn.LayerNorm(width), nn.Linear(width, mult * width), nn.GELU(),
                         nn.Linear(mult * width, width))


class ResamplerLayer(nn.Module):
    """``latents += attn(media, latents)``; ``latents += ffn(latents)``."""

    def __init__(self, width: int, num_heads: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = ResamplerAttention(width, num_heads)
        self.ffn = ResamplerFeedForward(width, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``media [B, N, W]``, ``latents [B, M, W]``, ``mask [B, N]`` or ``None`` → ``[B, M, W]``."""
        latents = latents + self.attn(media, latents, mask)
        return latents + self.ffn(latents)


class Resampler(nn.Module):
    """Perceiver resampler connector: ``tokens [B, N, Dv]`` → ``[B, M, out_dim]`` with ``M = num_latents``.

    Usable wherever a connector ``Callable[[int, int], nn.Module]`` is expected (``in_dim`` = encoder
    width, ``out_dim`` = LM width). See the module docstring for the layer structure.

    Args:
        in_dim: encoder width Dv.
        out_dim: language-model width D.
        num_latents: M, the number of output embeddings.
        depth: number of (cross-attention, FFN) layers.
        num_heads: attention heads.
        head_dim: width per head; the internal width is ``W = num_heads * head_dim``.
        ff_mult: FFN hidden width is ``ff_mult * W``.
        max_media_tokens: if set, a learned position embedding ``[max_media_tokens, W]`` is added to the
            projected image tokens (then the output depends on token order, and ``N`` may not exceed it);
            ``None`` = no positions, the output is invariant to permuting the image tokens.
    """

    def __init__(self, in_dim: int, out_dim: int, num_latents: int = 64, depth: int = 2, num_heads: int = 8,
                 head_dim: int = 64, ff_mult: int = 4, max_media_tokens: int | None = None) -> None:
        super().__init__()
        _check_positive(num_latents=num_latents, depth=depth, num_heads=num_heads, head_dim=head_dim,
                        ff_mult=ff_mult,
                        max_media_tokens=1 if max_media_tokens is None else max_media_tokens)
        width = num_heads * head_dim
        self.width, self.max_media_tokens = width, max_media_tokens
        self.input_proj = nn.Linear(in_dim, width)
        self.latents = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.media_pos = None
        if max_media_tokens is not None:
            self.media_pos = nn.Parameter(torch.randn(max_media_tokens, width) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(width, num_heads, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    @property
    def num_latents(self) -> int:
        """M, the number of output embeddings."""
        return self.latents.shape[0]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Resample the image tokens into ``M`` embeddings.

        Args:
            tokens: ``[B, N, Dv]`` image tokens (cast to the resampler's dtype, e.g. behind a half-precision
                encoder).
            mask: ``[B, N]`` (1/True = real token, 0/False = padding); ``None`` = all real.

        Returns:
            ``[B, M, out_dim]``.
        """
        media = self.input_proj(tokens.to(self.input_proj.weight.dtype))
        if self.media_pos is not None:
            media = media + self._positions(media.shape[1])
        mask = self._check_mask(mask, tokens)
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents, mask)
        return self.proj(self.norm(latents))

    def _positions(self, num_tokens: int) -> torch.Tensor:
        """The first ``N`` rows of the media position embedding, ``[N, W]``."""
        assert self.media_pos is not None
        if num_tokens > self.max_media_tokens:
            raise ValueError(f"Resampler got {num_tokens} image tokens but max_media_tokens="
                             f"{self.max_media_tokens}; raise max_media_tokens in the connector's init_args")
        return self.media_pos[:num_tokens]

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
        """``mask`` as bool ``[B, N]`` on the tokens' device, or ``None``; raises on a wrong shape."""
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"Resampler mask has shape {tuple(mask.shape)}, expected {tuple(tokens.shape[:2])} "
                             f"(B, N) for tokens of shape {tuple(tokens.shape)}")
        return mask.to(device=tokens.device, dtype=torch.bool)


def _check_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first argument that is not ``>= 1``."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"Resampler {name} must be >= 1, got {value}")
