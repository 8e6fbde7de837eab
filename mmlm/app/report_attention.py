"""Attention maps for ``mmlm report --load-model``: where each BLIP-2 query looks in the image.

With the run's checkpoint loaded (:func:`mmlm.models.exported.load_checkpoint`), each shown image goes through the
model's evaluation transform and frozen encoder, and :func:`mmlm.connectors.qformer.cross_attention_maps` gives the
Q-Former's cross-attention over the image tokens; averaged over layers and heads it is one map per query ``[M, N]``,
drawn over the image as a red overlay (one small picture per query). A Q-Former with instruction-aware queries
(``qformer_text_input``) reads the example's prompt beside its queries, as in evaluation. Families without a Q-Former
get none.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import torch

#: Queries drawn per example (the first ones), and the side of each overlay in pixels.
MAX_QUERIES = 8
OVERLAY_SIDE = 96


def evaluated_checkpoint(log_dir: Path, config: dict[str, Any]) -> Path | None:
    """The checkpoint whose predictions the run holds: ``ckpt_path`` of its config (validate/test), else the newest
    ``*.ckpt`` under ``log_dir`` (fit); ``None`` when there is none."""
    ckpt = config.get("ckpt_path")
    if isinstance(ckpt, str) and Path(ckpt).is_file():
        return Path(ckpt)
    found = sorted(log_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def patch_grid(tokens: int) -> tuple[int, int] | None:
    """``(leading tokens to drop, grid side)`` of ``tokens`` image tokens: a square grid, or a class token + one;
    ``None`` otherwise."""
    for extra in (0, 1):
        side = math.isqrt(tokens - extra)
        if side * side == tokens - extra and side > 0:
            return extra, side
    return None


class QueryAttention:
    """Per-query attention maps of a BLIP-2 module over its image tokens.

    Args:
        model: a module with ``qformer``, ``encoder_tokens`` and ``image_preprocess`` (BLIP-2).
    """

    def __init__(self, model: Any) -> None:
        from mmlm.inference import image_transform

        self.model, self.transform = model.eval(), image_transform(model)

    @torch.no_grad()
    def maps(self, image: bytes, prompt: str = "") -> torch.Tensor:
        """``image`` (encoded bytes) → ``[M, N]``: each query's cross-attention over the N image tokens, averaged
        over the cross-attention layers and heads (rows sum to 1); ``prompt`` joins the queries where the Q-Former
        reads instructions."""
        from datamodules.pipeline.collate import instructions
        from mmlm.connectors.qformer import cross_attention_maps

        pixels = self.transform(image).unsqueeze(0).to(self.model.device)
        tokens = self.model.encoder_tokens(pixels)
        text = {}
        if self.model.qformer.with_text:
            ids, mask = instructions([prompt], self.model.qformer_tokenizer, self.model.qformer.embeddings.position
                                     .num_embeddings)
            text = dict(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device))
        return cross_attention_maps(self.model.qformer, tokens, **text)[0].float().mean(dim=(0, 1)).cpu()

    def overlays(self, image: bytes, prompt: str = "") -> str:
        """HTML: one small picture per query (the first :data:`MAX_QUERIES`), the query's attention in red over the
        image; ``""`` when the image tokens form no square grid."""
        maps = self.maps(image, prompt)
        grid = patch_grid(maps.shape[-1])
        if grid is None:
            return ""
        drop, side = grid
        pictures = [overlay(image, maps[q, drop:].reshape(side, side)) for q in range(min(MAX_QUERIES, len(maps)))]
        return '<div class="attn">' + "".join(
            f'<img src="{uri}" title="query {q}" alt="query {q}">' for q, uri in enumerate(pictures)) + "</div>"


def overlay(image: bytes, heat: torch.Tensor, side: int = OVERLAY_SIDE) -> str:
    """``heat [g, g]`` scaled to ``[0, 1]``, upsampled over ``image`` (resized to ``side``) as red with that
    opacity; a PNG ``data:`` URI."""
    from PIL import Image

    base = Image.open(io.BytesIO(image)).convert("RGB").resize((side, side))
    span = float(heat.max() - heat.min()) or 1.0
    levels = ((heat - heat.min()) / span * 200).to(torch.uint8).numpy()
    alpha = Image.fromarray(levels, mode="L").resize((side, side), Image.BILINEAR)
    red = Image.new("RGB", (side, side), (230, 30, 30))
    out = io.BytesIO()
    Image.composite(red, base, alpha).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")
