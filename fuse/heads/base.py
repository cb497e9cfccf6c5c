"""What every head is built from: the :class:`FusionHead` base class (input checks, padding, per-modality
projection, the ``explain`` / ``stacked_overrides`` hooks) and the shared layers (masked mean, run-seeded
dropout, attention, projection / classifier / feed-forward blocks)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcache.errors import BadInputError

__all__ = ["Attention", "FusionHead", "RunDropout", "check_heads", "classifier", "dropout_generator", "feed_forward", "masked_mean",
           "projection", "set_dropout_generators"]


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
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


def projection(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    """Per-modality projection to the shared width, as in the paper: Linear + LayerNorm + Dropout.

    (B, L, in_dim) float32 -> (B, L, dim) float32.
    """
    return nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim), RunDropout(dropout))


def classifier(in_dim: int, dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """MLP classifier Linear-GELU-Dropout-Linear. (B, in_dim) float32 -> (B, C) float32."""
    return nn.Sequential(
        nn.Linear(in_dim, dim), nn.GELU(), RunDropout(dropout), nn.Linear(dim, num_classes)
    )


def feed_forward(dim: int, dropout: float) -> nn.Sequential:
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


def check_heads(dim: int, heads: int) -> None:
    """:class:`BadInputError` unless ``dim`` splits evenly into ``heads`` attention heads."""
    if dim % heads:
        raise BadInputError(f"dim ({dim}) must be divisible by heads ({heads})")


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
        self.text_proj = projection(text_dim, dim, dropout) if "text" in self.uses else None
        self.image_proj = projection(image_dim, dim, dropout) if "image" in self.uses else None

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


