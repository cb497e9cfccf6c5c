"""Self-attention fusion: a fusion token attends over the text and image tokens together."""

from __future__ import annotations

import torch
from mmcache.fuse.heads.base import Attention, FusionHead, RunDropout, check_heads, classifier, feed_forward
from mmcache.fuse.heads.registry import register_head
from torch import Tensor, nn

# --------------------------------------------------------------------------------------
# attention heads
# --------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + Attn(LN(x)), then x + FF(LN(x)). (B, L, D) float32."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ff = feed_forward(dim, dropout)
        self.drop = RunDropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, queries: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``queries``: update only the first ``queries`` positions (all attend over every key); the
        output is then (B, queries, D). The last layer of a head that reads one token needs no more."""
        h = self.norm1(x)
        q_in, x = (h, x) if queries is None else (h[:, :queries], x[:, :queries])
        a, w = self.attn(q_in, h, mask)
        x = x + self.drop(a)
        return x + self.ff(self.norm2(x)), w


@register_head("self_attention")
class SelfAttentionHead(FusionHead):
    """Joint self-attention over [fusion token; text tokens; image tokens].

    Learned modality-type embeddings (3: fusion/text/image) tell the layers which tokens came
    from where; no position embeddings (BERT/DINOv2 features already carry position). The
    fusion token is always real, so every query has at least one real key: the softmax never
    sees an all-masked row, even when both modalities of a sample are missing.

    attn: ``{"layer{i}": (B, H, 1+Lt+Li, 1+Lt+Li) float32}`` for i in range(layers).
    """

    uses = frozenset({"text", "image"})
    handles_missing = True

    def __init__(self, **args):
        super().__init__(**args)
        dim, dropout = args["dim"], args["dropout"]
        check_heads(dim, args["heads"])
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.zeros(3, dim))  # 0 fusion, 1 text, 2 image
        nn.init.trunc_normal_(self.fusion_token, std=0.02)
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, args["heads"], dropout) for _ in range(args["layers"]))
        self.norm = nn.LayerNorm(dim)
        self.classifier = classifier(dim, dim, args["num_classes"], dropout)

    def _embed(self, text: Tensor, image: Tensor) -> Tensor:
        """[fusion token; text; image] plus their modality embeddings: (B, 1+Lt+Li, D) float32."""
        B = text.shape[0]
        return torch.cat(
            [
                self.fusion_token.expand(B, -1, -1) + self.modality_embed[0],
                text + self.modality_embed[1],
                image + self.modality_embed[2],
            ],
            dim=1,
        )

    def _forward(self, text, text_mask, image, image_mask):
        B = text.shape[0]
        x = self._embed(text, image)  # (B, 1+Lt+Li, D)
        mask = torch.cat([text_mask.new_ones(B, 1), text_mask, image_mask], dim=1)  # (B, 1+Lt+Li)
        attn = {}
        # Only the fusion token's final state is classified, so unless the full attention maps are
        # asked for, the last layer updates that one position: same logits, and its feed-forward runs
        # on 1 row instead of 1+Lt+Li (3x less for vector features, ~all of it for token sequences).
        fast = not self._attn_modules[0].need_weights
        last = len(self.layers) - 1
        for n, layer in enumerate(self.layers):
            x, attn[f"layer{n}"] = layer(x, mask, queries=1 if (fast and n == last) else None)
        return self.classifier(self.norm(x[:, 0])), attn

    explains = True
    explain_kind = "fusion token"

    @torch.inference_mode()
    def explain(self, text, text_mask, image, image_mask):
        """Shares = the fusion token's last-layer attention (mean over heads) on text / image / itself:
        the three add up to 1. Weights: that same row over each modality's tokens."""
        _, attn = self(text, text_mask, image, image_mask, return_attention=True)
        lt = text.shape[1]
        w = attn[f"layer{len(self.layers) - 1}"][:, :, 0, :].mean(1)  # (B, 1+Lt+Li) fusion token's row
        t, i = w[:, 1:1 + lt], w[:, 1 + lt:]
        return {"text_share": t.sum(1), "image_share": i.sum(1), "self_share": w[:, 0],
                "text_weights": t, "image_weights": i}

    @classmethod
    def stacked_overrides(cls):
        # fusion_token and modality_embed are parameters outside Linear/LayerNorm
        return {"_embed": _stacked_embed}


def _stacked_embed(self: SelfAttentionHead, text: Tensor, image: Tensor) -> Tensor:
    """SelfAttentionHead._embed in a stack (fuse.stack): per-member fusion token (M, 1, 1, D) and
    modality embeddings (M, 3, D); text / image (M*b, L, D) member-major -> (M*b, 1+Lt+Li, D)."""
    m = self.modality_embed.shape[0]
    b = text.shape[0] // m
    emb = self.modality_embed[:, None].expand(m, b, 3, -1).reshape(m * b, 3, -1)  # (M*b, 3, D)
    tok = self.fusion_token.reshape(m, 1, 1, -1).expand(m, b, 1, -1).reshape(m * b, 1, -1)
    return torch.cat([tok + emb[:, None, 0], text + emb[:, None, 1], image + emb[:, None, 2]], dim=1)


