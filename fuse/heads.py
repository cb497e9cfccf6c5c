"""Fusion heads: small models trained on cached BERT / DINOv2 features.

A timm-style registry: ``@register_head("name")`` on a :class:`FusionHead` subclass, then
``create_head(name, text_dim=..., image_dim=..., num_classes=...)``, ``list_heads()``, and
``head_uses(name)`` so the trainer only loads the modalities a head reads.

Every head has the same forward signature (shapes use B=batch, Lt/Li=text/image tokens,
Dt/Di=feature widths from the cache, D=``dim``, C=``num_classes``, H=``heads``)::

    forward(text, text_mask, image, image_mask, return_attention=False)
        text:       (B, Lt, Dt) float32   or None if the head does not use text
        text_mask:  (B, Lt) bool, True = real token (None = all real)
        image:      (B, Li, Di) float32   or None if the head does not use images
        image_mask: (B, Li) bool, True = real token (None = all real)
        -> logits (B, C) float32, or (logits, attn: dict[str, (B, H, Lq, Lk) float32])

Vector features (CLS / mean) come in as sequences of length 1 with all-True masks, so one
code path serves both cached feature kinds.

Mask convention, everywhere: boolean, True = real token. A row whose mask is all False is a
missing sample for that modality; heads must still return finite logits for it (see
``_masked_mean`` and ``Attention``). Padded positions are zeroed on entry, so garbage
there (even NaN/inf) can never leak into a prediction or a gradient.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcache.errors import BadInputError
from mmcache.plugins import load_plugins

logger = logging.getLogger(__name__)

__all__ = [
    "FusionHead",
    "RunDropout",
    "count_parameters",
    "create_head",
    "dropout_generator",
    "get_head",
    "head_uses",
    "list_heads",
    "register_head",
    "set_dropout_generators",
]

_HEADS: dict[str, type[FusionHead]] = {}

# Arguments every head constructor takes; anything else in create_head(**kw) must be a
# keyword the specific head declares, otherwise it is a user error (typo in a config).
_COMMON_ARGS = {"text_dim", "image_dim", "num_classes", "dim", "layers", "heads", "dropout"}


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------


def register_head(name: str):
    """Class decorator: register a :class:`FusionHead` subclass under ``name``."""

    def wrap(cls: type[FusionHead]) -> type[FusionHead]:
        if name in _HEADS:
            # A programming error (two heads with one name), not user input.
            raise ValueError(f"fusion head {name!r} is already registered by {_HEADS[name].__name__}")
        if not cls.uses or not set(cls.uses) <= {"text", "image"}:
            raise ValueError(f"head {name!r}: uses must be a non-empty subset of {{'text', 'image'}}")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return wrap


def list_heads() -> list[str]:
    """Names of all registered heads (built-in and ``mmcache.heads`` plugins), sorted."""
    load_plugins("mmcache.heads")
    return sorted(_HEADS)


def get_head(name: str) -> type[FusionHead]:
    """The class registered as ``name`` (for its hooks: ``uses``, ``explains``, ``stacked_overrides``)."""
    return _lookup(name)


def _lookup(name: str) -> type[FusionHead]:
    load_plugins("mmcache.heads")
    try:
        return _HEADS[name]
    except KeyError:
        raise BadInputError(
            f"unknown fusion head {name!r}; known heads: {', '.join(list_heads())}"
        ) from None


def head_uses(name: str) -> set[str]:
    """Modalities head ``name`` reads: ``{"text"}``, ``{"image"}`` or ``{"text", "image"}``."""
    return set(_lookup(name).uses)


def create_head(
    name: str,
    *,
    text_dim: int | None,
    image_dim: int | None,
    num_classes: int,
    dim: int = 256,
    layers: int = 1,
    heads: int = 4,
    dropout: float = 0.1,
    **kw,
) -> FusionHead:
    """Build head ``name``. ``text_dim`` / ``image_dim`` may be None for a modality it ignores.

    Raises :class:`BadInputError` for an unknown name, bad sizes, or an unknown keyword.
    """
    cls = _lookup(name)
    # Only named parameters count: a subclass's **args just forwards the common ones.
    named = {
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    }
    unknown = set(kw) - (named - _COMMON_ARGS)
    if unknown:
        raise BadInputError(f"fusion head {name!r} does not take option(s): {', '.join(sorted(unknown))}")
    model = cls(
        text_dim=text_dim,
        image_dim=image_dim,
        num_classes=num_classes,
        dim=dim,
        layers=layers,
        heads=heads,
        dropout=dropout,
        **kw,
    )
    logger.debug("created fusion head %s with %d parameters", name, count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens. x: (B, L, D) float32, mask: (B, L) bool -> (B, D) float32.

    An all-False row gives a zero vector: the denominator is clamped to 1 (no 0/0 NaN), and
    ``where`` (not multiply) keeps non-finite values in padded slots out of the sum.
    """
    m = mask.unsqueeze(-1)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
    return total / m.sum(1).clamp(min=1).to(x.dtype)


class RunDropout(nn.Dropout):
    """Dropout whose masks come from the run's own ``torch.Generator`` (or each stack member's own).

    A run's numbers must be a function of its config, data and seed alone: masks drawn from the global
    RNG would depend on whatever else drew from it (for a stacked member: which other members share its
    stack). The trainer hands the generators over with :func:`set_dropout_generators`: one per member of
    a batch laid out member-major (rows ``m*b .. (m+1)*b - 1`` are member m's), each drawing its slice of
    the mask with the same shape and in the same call order as the single model, so a member's masks do
    not depend on the stack it is in. Without generators (a head used outside the trainers) it is
    ``nn.Dropout``. Identity in eval mode. No parameters or buffers: state_dict keys are unchanged.

    forward(x (B, ...) float) -> (B, ...) same dtype.
    """

    generators: list[torch.Generator] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.generators:
            return super().forward(x)
        gens = self.generators
        b = x.shape[0] // len(gens)
        keep = torch.empty((len(gens), b, *x.shape[1:]), dtype=x.dtype, device=x.device)
        for k, g in enumerate(gens):
            keep[k].bernoulli_(1.0 - self.p, generator=g)
        return x * keep.view(x.shape) * (1.0 / (1.0 - self.p))


def set_dropout_generators(model: nn.Module, generators: list[torch.Generator] | None) -> None:
    """Draw every :class:`RunDropout` mask of ``model`` from ``generators`` (one per member, member-major
    rows; one for a single model); None: back to the global RNG."""
    for mod in model.modules():
        if isinstance(mod, RunDropout):
            mod.generators = list(generators) if generators else None


def dropout_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The dropout generator of the run with ``seed``, on ``device``: its own stream, not the shuffle's
    (``Generator().manual_seed(seed)``), so masks and batch order are not drawn from one sequence."""
    return torch.Generator(device=device).manual_seed((seed * 2654435761 + 0x5EED) % 2**63)


def _projection(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    """Per-modality projection to the shared width, as in the paper: Linear + LayerNorm + Dropout.

    (B, L, in_dim) float32 -> (B, L, dim) float32.
    """
    return nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim), RunDropout(dropout))


def _classifier(in_dim: int, dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """MLP classifier Linear-GELU-Dropout-Linear. (B, in_dim) float32 -> (B, C) float32."""
    return nn.Sequential(
        nn.Linear(in_dim, dim), nn.GELU(), RunDropout(dropout), nn.Linear(dim, num_classes)
    )


def _feed_forward(dim: int, dropout: float) -> nn.Sequential:
    """Transformer FF block, width 4*dim. (B, L, D) float32 -> (B, L, D) float32."""
    return nn.Sequential(
        nn.Linear(dim, 4 * dim),
        nn.GELU(),
        RunDropout(dropout),
        nn.Linear(4 * dim, dim),
        RunDropout(dropout),
    )


class Attention(nn.Module):
    """Multi-head attention that returns its per-head weights.

    Written out instead of ``nn.MultiheadAttention`` so the mask stays in our convention
    (True = real key) end to end and the fully-masked case is explicit:

    * padded keys get the most negative finite score, so exp() underflows to exactly 0 and
      appending padding cannot change the output;
    * a query row whose keys are ALL padding (missing modality) would otherwise get a uniform
      softmax over garbage (or NaN with -inf). We zero its weights and its output instead,
      so in a residual block the layer is a no-op for that sample.

    forward(q_in (B, Lq, D) float32, kv_in (B, Lk, D) float32, key_mask (B, Lk) bool)
        -> out (B, Lq, D) float32, weights (B, H, Lq, Lk) float32 (before dropout)
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = RunDropout(dropout)

    # Set by FusionHead.forward: False (training, plain prediction) takes the fused SDPA kernel, which
    # never materialises the (B, H, Lq, Lk) weights; True takes the explicit path below that returns them.
    need_weights: bool = True

    def _values(self, kv_in: Tensor) -> Tensor:
        """The value half of the kv projection alone: (B, Lk, D) float32 -> (B, Lk, D) float32."""
        D = kv_in.shape[-1]
        return F.linear(kv_in, self.kv.weight[D:], self.kv.bias[D:])

    def forward(self, q_in: Tensor, kv_in: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        B, Lq, D = q_in.shape
        Lk = kv_in.shape[1]
        has_any = key_mask.any(-1)  # (B,) False for a missing modality
        if Lk == 1:
            # One key: softmax gives it weight 1 whatever the query, so only the value projection is
            # needed (q and k are skipped: a third of the work for vector cls/mean features).
            w = has_any.to(kv_in.dtype)[:, None, None, None].expand(B, self.heads, Lq, 1)  # (B, H, Lq, 1)
            v = self._values(kv_in)  # (B, 1, D)
            v = v.view(B, 1, self.heads, self.head_dim).transpose(1, 2)  # (B, H, 1, hd)
            y = (self.drop(w) @ v).transpose(1, 2).reshape(B, Lq, D)
            return self.out(y) * has_any.to(y.dtype)[:, None, None], (w if self.need_weights else None)
        q = self.q(q_in).view(B, Lq, self.heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, hd)
        k, v = self.kv(kv_in).view(B, Lk, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # SDPA's own attention dropout draws from the global RNG; with dropout in training the explicit path
        # below takes its masks from the run's generator (RunDropout) instead.
        if not self.need_weights and not (self.training and self.drop.p > 0):
            # Rows without any real key would be all -inf (NaN); give them one dummy key and zero them after.
            allowed = (key_mask | ~has_any[:, None])[:, None, None, :]  # (B, 1, 1, Lk) True = attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            y = y.transpose(1, 2).reshape(B, Lq, D)
            return self.out(y) * has_any.to(y.dtype)[:, None, None], None
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, Lq, Lk)
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        has_key = key_mask.any(-1).to(scores.dtype)  # (B,) 0.0 for a missing modality
        weights = scores.softmax(-1) * has_key[:, None, None, None]
        y = (self.drop(weights) @ v).transpose(1, 2).reshape(B, Lq, D)
        return self.out(y) * has_key[:, None, None], (weights if self.need_weights else None)


# --------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------


class FusionHead(nn.Module):
    """Base class: input checks, per-modality projection, and the common forward signature.

    Subclasses set ``uses`` and implement ``_forward(text, text_mask, image, image_mask)``
    returning ``(logits (B, C) float32, attn dict)`` on already projected inputs:
    text (B, Lt, D) float32 / image (B, Li, D) float32, or None when not in ``uses``.
    """

    name: str = ""
    uses: frozenset[str] = frozenset()
    # True: with one used modality missing (all-False mask row) the head still gives a meaningful
    # answer from the other (attention just has fewer keys); predict marks such answers.
    handles_missing: bool = False
    # True: the head implements :meth:`explain` (analyze's attention section, Predictor.explain);
    # ``explain_kind`` names what its shares measure, for reports.
    explains: bool = False
    explain_kind: str = ""

    def __init__(
        self,
        *,
        text_dim: int | None,
        image_dim: int | None,
        num_classes: int,
        dim: int,
        layers: int,
        heads: int,
        dropout: float,
    ):
        super().__init__()
        for arg, value in (("num_classes", num_classes), ("dim", dim), ("layers", layers), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise BadInputError(f"{type(self).__name__}: {arg} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise BadInputError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        self.text_dim, self.image_dim = text_dim, image_dim
        self.num_classes, self.dim = num_classes, dim
        for modality, in_dim in (("text", text_dim), ("image", image_dim)):
            if modality not in self.uses:
                continue
            if not isinstance(in_dim, int) or in_dim < 1:
                raise BadInputError(f"{type(self).__name__} needs {modality}_dim > 0, got {in_dim!r}")
        self.text_proj = _projection(text_dim, dim, dropout) if "text" in self.uses else None
        self.image_proj = _projection(image_dim, dim, dropout) if "image" in self.uses else None

    def _prep(self, x: Tensor | None, mask: Tensor | None, modality: str) -> tuple[Tensor, Tensor] | None:
        """Check one modality and project it: (B, L, D_in) -> ((B, L, D) float32, (B, L) bool)."""
        if modality not in self.uses:
            return None  # ignored; the caller may pass None or anything
        if x is None:
            raise BadInputError(f"fusion head {self.name!r} needs {modality} features, got None")
        in_dim = self.text_dim if modality == "text" else self.image_dim
        if x.dim() != 3 or x.shape[-1] != in_dim:
            raise BadInputError(
                f"{modality} features must be (B, L, {in_dim}), got {tuple(x.shape)}"
            )
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
            # Strict on purpose: an int/float mask may follow the opposite convention.
            raise BadInputError(
                f"{modality}_mask must be bool (B, L)={tuple(x.shape[:2])} with True = real token, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        proj = self.text_proj if modality == "text" else self.image_proj
        # Zero padded slots first: garbage (even NaN) there must not reach outputs or grads.
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0).to(proj[0].weight.dtype)
        return proj(x), mask

    def forward(
        self,
        text: Tensor | None,
        text_mask: Tensor | None,
        image: Tensor | None,
        image_mask: Tensor | None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """See module docstring. Returns logits (B, C) float32 [, attn dict]."""
        if not hasattr(self, "_attn_modules"):  # found once: walking the module tree every step costs ~1.5%
            self._attn_modules = [m for m in self.modules() if isinstance(m, Attention)]
        for m in self._attn_modules:
            m.need_weights = return_attention
        t = self._prep(text, text_mask, "text")
        i = self._prep(image, image_mask, "image")
        if t is not None and i is not None and t[0].shape[0] != i[0].shape[0]:
            raise BadInputError(f"batch sizes differ: text {t[0].shape[0]} vs image {i[0].shape[0]}")
        logits, attn = self._forward(*(t or (None, None)), *(i or (None, None)))
        return (logits, attn) if return_attention else logits

    def _forward(self, text, text_mask, image, image_mask) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def explain(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> dict[str, Tensor | None]:
        """What the head attends to, per post (only where :attr:`explains`; inputs as for ``forward``,
        masks required). Returns ``text_share`` / ``image_share`` (B,) float32 in [0, 1], ``self_share``
        (B,) float32 or None (weight a head keeps on its own summary token), and ``text_weights``
        (B, Lt) / ``image_weights`` (B, Li) float32 over the tokens (padded positions: ignore)."""
        raise NotImplementedError(f"fusion head {self.name!r} does not explain its predictions")

    @classmethod
    def stacked_overrides(cls) -> dict[str, Callable]:
        """Method name -> replacement, bound on the stacked copy of this head in :mod:`fuse.stack`.

        The stack turns every Linear / LayerNorm into a member-batched one; a head with parameters
        of its own (outside those modules) must say how its code uses them with a leading member
        axis (M, ...). None needed (the default): the head stacks as is. Without an override, a head
        with its own parameters is trained one model per run."""
        return {}


# --------------------------------------------------------------------------------------
# vector heads: pool first, then an MLP (``layers`` and ``heads`` are unused)
# --------------------------------------------------------------------------------------


class _PooledHead(FusionHead):
    """Masked-mean pool each used modality, concat in (text, image) order, MLP classifier."""

    def __init__(self, **args):
        super().__init__(**args)
        in_dim = args["dim"] * len(self.uses)
        self.classifier = _classifier(in_dim, args["dim"], args["num_classes"], args["dropout"])

    def _forward(self, text, text_mask, image, image_mask):
        pooled = [_masked_mean(x, m) for x, m in ((text, text_mask), (image, image_mask)) if x is not None]
        return self.classifier(torch.cat(pooled, dim=-1)), {}


@register_head("text_only")
class TextOnlyHead(_PooledHead):
    """Text baseline: masked-mean of projected text tokens (B, D) -> MLP -> (B, C)."""

    uses = frozenset({"text"})


@register_head("image_only")
class ImageOnlyHead(_PooledHead):
    """Image baseline: masked-mean of projected image tokens (B, D) -> MLP -> (B, C)."""

    uses = frozenset({"image"})


@register_head("basic")
class BasicFusionHead(_PooledHead):
    """Late fusion (the paper's "basic"): concat of pooled text and image, (B, 2D) -> MLP."""

    uses = frozenset({"text", "image"})


# --------------------------------------------------------------------------------------
# attention heads
# --------------------------------------------------------------------------------------


class _EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + Attn(LN(x)), then x + FF(LN(x)). (B, L, D) float32."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ff = _feed_forward(dim, dropout)
        self.drop = RunDropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, queries: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``queries``: update only the first ``queries`` positions (all attend over every key); the
        output is then (B, queries, D). The last layer of a head that reads one token needs no more."""
        h = self.norm1(x)
        q_in, x = (h, x) if queries is None else (h[:, :queries], x[:, :queries])
        a, w = self.attn(q_in, h, mask)
        x = x + self.drop(a)
        return x + self.ff(self.norm2(x)), w


def _check_heads(dim: int, heads: int) -> None:
    if dim % heads:
        raise BadInputError(f"dim ({dim}) must be divisible by heads ({heads})")


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
        _check_heads(dim, args["heads"])
        self.fusion_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.zeros(3, dim))  # 0 fusion, 1 text, 2 image
        nn.init.trunc_normal_(self.fusion_token, std=0.02)
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.layers = nn.ModuleList(_EncoderLayer(dim, args["heads"], dropout) for _ in range(args["layers"]))
        self.norm = nn.LayerNorm(dim)
        self.classifier = _classifier(dim, dim, args["num_classes"], dropout)

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


class _CrossLayer(nn.Module):
    """One cross-attention stream layer: q + CA(LN(q), LN(kv)), then q + FF(LN(q)).

    q: (B, Lq, D) float32, kv: (B, Lk, D) float32, kv_mask: (B, Lk) bool -> (B, Lq, D), weights.
    If all of a sample's keys are padding, the cross-attention term is zero (see Attention):
    that stream keeps its own features and only the FF block updates it.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ff = _feed_forward(dim, dropout)
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
        _check_heads(dim, heads)
        self.text_layers = nn.ModuleList(_CrossLayer(dim, heads, dropout) for _ in range(args["layers"]))
        self.image_layers = nn.ModuleList(_CrossLayer(dim, heads, dropout) for _ in range(args["layers"]))
        self.text_norm, self.image_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.classifier = _classifier(2 * dim, dim, args["num_classes"], dropout)

    def _forward(self, text, text_mask, image, image_mask):
        attn = {}
        t, i = text, image
        for n, (t_layer, i_layer) in enumerate(zip(self.text_layers, self.image_layers, strict=True)):
            t_new, attn[f"text_to_image{n}"] = t_layer(t, i, image_mask)
            i_new, attn[f"image_to_text{n}"] = i_layer(i, t, text_mask)
            t, i = t_new, i_new  # update both only after both used layer n-1 outputs
        pooled = torch.cat(
            [_masked_mean(self.text_norm(t), text_mask), _masked_mean(self.image_norm(i), image_mask)], dim=-1
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
