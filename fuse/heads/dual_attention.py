"""Dual-attention (cross-modal) fusion: text attends to image and image to text, then both are pooled."""

from __future__ import annotations

import torch
from mmcache.fuse.heads.base import (
    Attention,
    FusionHead,
    RunDropout,
    check_heads,
    classifier,
    feed_forward,
    masked_mean,
)
from mmcache.fuse.heads.registry import register_head
from torch import Tensor, nn


class CrossLayer(nn.Module):
    """One cross-attention stream layer: q + CA(LN(q), LN(kv)), then q + FF(LN(q)).

    q: (B, Lq, D) float32, kv: (B, Lk, D) float32, kv_mask: (B, Lk) bool -> (B, Lq, D), weights.
    If all of a sample's keys are padding, the cross-attention term is zero (see Attention):
    that stream keeps its own features and only the FF block updates it.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ff = feed_forward(dim, dropout)
        self.drop = RunDropout(dropout)

    def forward(self, q: Tensor, kv: Tensor, kv_mask: Tensor) -> tuple[Tensor, Tensor]:
        a, w = self.attn(self.norm_q(q), self.norm_kv(kv), kv_mask)
        q = q + self.drop(a)
        return q + self.ff(self.norm_ff(q)), w


@register_head("dual_attention")
class DualAttentionHead(FusionHead):
    """Two cross-attention streams: text queries over image, image queries over text.

    Layering choice (co-attention, as in ViLBERT): layer n updates BOTH streams from the
    outputs of layer n-1, simultaneously::

        t_n = TextLayer_n(t_{n-1}, kv=i_{n-1})     i_n = ImageLayer_n(i_{n-1}, kv=t_{n-1})

    so the two streams are symmetric (neither sees the other's current-layer update first)
    and deeper layers attend over already-fused features. Each stream is then LayerNormed,
    masked-mean pooled over its own real tokens, concatenated (B, 2D), and classified.

    Missing modality (all-False mask row): the other stream's cross-attention output is zeroed
    (no real keys), and the missing stream itself pools to a zero vector, so logits stay finite.

    attn: ``{"text_to_image{n}": (B, H, Lt, Li), "image_to_text{n}": (B, H, Li, Lt)}`` float32.
    """

    uses = frozenset({"text", "image"})
    handles_missing = True

    def __init__(self, **args):
        super().__init__(**args)
        dim, heads, dropout = args["dim"], args["heads"], args["dropout"]
        check_heads(dim, heads)
        self.text_layers = nn.ModuleList(CrossLayer(dim, heads, dropout) for _ in range(args["layers"]))
        self.image_layers = nn.ModuleList(CrossLayer(dim, heads, dropout) for _ in range(args["layers"]))
        self.text_norm, self.image_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.classifier = classifier(2 * dim, dim, args["num_classes"], dropout)

    def _forward(self, text, text_mask, image, image_mask):
        attn = {}
        t, i = text, image
        for n, (t_layer, i_layer) in enumerate(zip(self.text_layers, self.image_layers, strict=True)):
            t_new, attn[f"text_to_image{n}"] = t_layer(t, i, image_mask)
            i_new, attn[f"image_to_text{n}"] = i_layer(i, t, text_mask)
            t, i = t_new, i_new  # update both only after both used layer n-1 outputs
        pooled = torch.cat(
            [masked_mean(self.text_norm(t), text_mask), masked_mean(self.image_norm(i), image_mask)], dim=-1
        )
        return self.classifier(pooled), attn

    explains = True
    explain_kind = "stream update"

    def _stream_hooks(self) -> tuple[list, dict[str, list]]:
        """Hooks on the last cross layer of each stream: record |own state| and |cross output| per query
        token, (B, Lq) float32 each."""
        got: dict[str, list] = {"text": [], "image": []}
        handles = []
        for stream, layers in (("text", self.text_layers), ("image", self.image_layers)):
            layer, state = layers[-1], {}
            handles.append(layer.register_forward_pre_hook(lambda _m, args, s=state: s.update(q=args[0].norm(dim=-1))))
            handles.append(layer.attn.register_forward_hook(
                lambda _m, _a, out, s=state, k=stream: got[k].append((s["q"], out[0].norm(dim=-1)))))
        return handles, got

    @torch.inference_mode()
    def explain(self, text, text_mask, image, image_mask):
        """Share of each stream's last update that comes from the other modality: |cross output| /
        (|own state| + |cross output|), mean over the stream's real tokens (its weights always sum to
        one over the other modality, so they cannot say this). ``text_share`` is the image stream's
        share from the text, and vice versa. Weights: last layer's cross attention (mean over heads,
        over the real query tokens) on each modality's tokens."""
        handles, streams = self._stream_hooks()
        try:
            _, attn = self(text, text_mask, image, image_mask, return_attention=True)
        finally:
            for h in handles:
                h.remove()
        n = len(self.text_layers) - 1
        t = attn[f"image_to_text{n}"].mean(1)  # (B, Li, Lt): image queries over text tokens
        i = attn[f"text_to_image{n}"].mean(1)  # (B, Lt, Li)
        t = (t * image_mask[:, :, None]).sum(1) / image_mask.sum(1, keepdim=True).clamp(min=1)  # (B, Lt)
        i = (i * text_mask[:, :, None]).sum(1) / text_mask.sum(1, keepdim=True).clamp(min=1)  # (B, Li)
        out = {"self_share": None, "text_weights": t, "image_weights": i}
        for stream, mask, key in (("text", text_mask, "image_share"), ("image", image_mask, "text_share")):
            q, a = streams[stream][-1]
            out[key] = (a / (a + q).clamp(min=1e-12) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return out
