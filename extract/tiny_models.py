"""Random-init checkpoints of real architectures, for tests and offline smoke runs.

Every builder writes a folder with ``save_pretrained`` (config, ``model.safetensors``, tokenizer or
image-processor files) that loads through the very same ``AutoTokenizer`` / ``AutoModel`` /
``AutoImageProcessor`` path a user takes with a hub id, so :mod:`extract.encoders` is exercised end to
end without network access. The weights are random: features are meaningless, shapes and code paths
are real.

Builders seed their own RNG (``torch.random.fork_rng``), so the same arguments give the same weights
and the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
import string
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from mmcache.errors import BadInputError

log = logging.getLogger(__name__)

__all__ = [
    "BERT_SPECIAL_TOKENS",
    "DEFAULT_WORDS",
    "PRESETS",
    "build_bert",
    "build_clip",
    "build_dinov2",
    "build_preset",
    "build_resnet",
    "build_roberta",
    "build_siglip",
    "build_vit",
    "make_vocab",
]

#: Written last into a built folder; its absence means the build was interrupted.
MARKER_NAME = ".mmcache_tiny_complete.json"

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

#: A few hundred common English words, sentiment-bearing ones included, so tiny tokenizers map real
#: text to real ids (not a wall of [UNK] / single letters).
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    the a an and or but not no yes is are was were be been being am do does did have has had i you he she
    it we they me him her us them my your his its our their this that these those there here what which
    who whom whose when where why how all any both each few more most other some such only own same so
    than too very can will just should would could may might must shall of in on at by for with about
    against between into through during before after above below to from up down out off over under
    again further then once if because as until while also even ever never always often sometimes still
    already now today tomorrow yesterday day night morning evening week year time life world people man
    woman child children friend friends family home house city place thing things way day days work
    school food water weather movie film music song book picture photo image video game team party trip
    dog cat car phone service hotel restaurant price quality product show story news one two three first
    last new old big small long short high low little much many great good better best bad worse worst
    nice fine ok okay well right wrong sure real true false happy sad angry glad excited bored tired
    scared afraid worried calm proud sorry lucky unlucky love loved loves loving like liked likes hate
    hated hates hating enjoy enjoyed enjoying want wanted need needed feel feels feeling felt think
    thought know knew see saw look looked looks watch watched go went going come came get got make made
    take took give gave say said tell told thank thanks please beautiful pretty lovely cute amazing
    awesome wonderful fantastic excellent perfect brilliant incredible fun funny cool sweet kind warm
    happy happiness joy joyful delight delighted pleased satisfied impressed glad smile smiles smiling
    laugh laughing cheerful positive recommend favorite favourite win won winning success hope hopeful
    awful terrible horrible disgusting ugly boring poor worst disappointed disappointing disappointment
    annoying annoyed upset unhappy sadness cry crying tears pain hurt broken fail failed failure lose
    lost losing negative problem problems issue issues waste rude dirty slow expensive cheap stupid
    mess messy sick ill dead death fear fearful lonely miserable depressed depressing hopeless angry
    furious mad hell damn shame shameful scary dangerous neutral average normal usual plain simple
    whatever meh maybe perhaps probably really quite rather pretty almost enough totally absolutely
    completely highly strongly definitely seriously literally honestly lol omg wow yay ugh
    """.split()
)


def make_vocab(extra_words: Iterable[str] | None = None) -> list[str]:
    """The tiny WordPiece vocabulary: specials, single characters, ``##`` letter pieces, words.

    Order is deterministic and duplicates are dropped (first occurrence wins); ``[PAD]`` is id 0.
    """
    pieces: list[str] = list(BERT_SPECIAL_TOKENS)
    pieces += list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    pieces += list(DEFAULT_WORDS)
    pieces += [w.strip().lower() for w in (extra_words or ()) if w.strip()]
    seen: set[str] = set()
    out: list[str] = []
    for p in pieces:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _prepare_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER_NAME
    if marker.exists():
        marker.unlink()
    return out


def _write_marker(out: Path, kind: str, kwargs: dict) -> None:
    (out / MARKER_NAME).write_text(json.dumps({"kind": kind, "kwargs": kwargs}, sort_keys=True, default=list))


@contextmanager
def _seeded(seed: int):
    """Seed torch for model init without disturbing the caller's global RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_bert(
    out_dir: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_position: int = 512,
    vocab_words: Iterable[str] | None = None,
    seed: int = 0,
) -> Path:
    """Build a random ``BertModel`` + fast WordPiece tokenizer into ``out_dir``; return the folder.

    The tokenizer is built from a ``vocab.txt`` (see :func:`make_vocab`) with
    ``BertTokenizerFast(vocab=PATH)``. (transformers 5 silently ignores the older ``vocab_file=``
    keyword and yields a tokenizer that maps every word to [UNK].)
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if hidden_size % num_heads:
        raise BadInputError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    kwargs = dict(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        intermediate_size=intermediate_size, max_position=max_position,
        vocab_words=list(vocab_words or ()), seed=seed,
    )
    out = _prepare_dir(out_dir)
    vocab = make_vocab(kwargs["vocab_words"])
    vocab_path = out / "vocab.txt"
    vocab_path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(vocab_path), do_lower_case=True)
    if tok.convert_tokens_to_ids("good") == tok.unk_token_id:  # the vocab_file= trap, guarded
        raise RuntimeError("tiny BERT tokenizer did not pick up its vocabulary")

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        model = BertModel(config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_marker(out, "bert", kwargs)
    log.info("built tiny BERT (hidden %d, %d layers) in %s", hidden_size, num_layers, out)
    return out


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build_dinov2(
    out_dir: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    patch_size: int = 8,
    image_size: int = 64,
    num_register_tokens: int = 0,
    resize_shortest_edge: int | None = None,
    seed: int = 0,
) -> Path:
    """Build a random ``Dinov2Model`` (``Dinov2WithRegistersModel`` if ``num_register_tokens > 0``).

    The image processor is a ``BitImageProcessor`` (what DINOv2 checkpoints ship): resize the shortest
    edge to ``resize_shortest_edge`` (default ``image_size``), center-crop ``image_size`` x
    ``image_size``, bicubic, ImageNet mean/std. Patch grid = ``image_size // patch_size`` per side.
    """
    from transformers import BitImageProcessor

    if hidden_size % num_heads:
        raise BadInputError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    kwargs = dict(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, patch_size=patch_size,
        image_size=image_size, num_register_tokens=num_register_tokens,
        resize_shortest_edge=resize_shortest_edge, seed=seed,
    )
    out = _prepare_dir(out_dir)
    common = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        patch_size=patch_size,
        image_size=image_size,
    )
    with _seeded(seed):
        if num_register_tokens > 0:
            from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

            model = Dinov2WithRegistersModel(
                Dinov2WithRegistersConfig(num_register_tokens=num_register_tokens, **common)
            )
        else:
            from transformers import Dinov2Config, Dinov2Model

            model = Dinov2Model(Dinov2Config(**common))
    processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": resize_shortest_edge or image_size},
        resample=3,  # PIL bicubic, as the released DINOv2 processors
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    _write_marker(out, "dinov2", kwargs)
    log.info("built tiny DINOv2 (hidden %d, %d registers) in %s", hidden_size, num_register_tokens, out)
    return out


def build_vit(
    out_dir: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    patch_size: int = 8,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Build a random ``ViTModel`` + ``ViTImageProcessor`` (resize to ``image_size`` square, mean/std 0.5)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    if hidden_size % num_heads:
        raise BadInputError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    kwargs = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                  patch_size=patch_size, image_size=image_size, seed=seed)
    out = _prepare_dir(out_dir)
    config = ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        patch_size=patch_size,
        image_size=image_size,
    )
    with _seeded(seed):
        model = ViTModel(config)
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    _write_marker(out, "vit", kwargs)
    return out


def build_resnet(
    out_dir: str | Path,
    *,
    hidden_sizes: tuple[int, ...] = (8, 16),
    depths: tuple[int, ...] = (1, 1),
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Build a random ``ResNetModel`` (basic blocks) + ``ConvNextImageProcessor`` as ResNet checkpoints use.

    Processor: resize shortest edge to ``image_size / 0.875``, center-crop ``image_size``, ImageNet
    mean/std. Output feature map: (B, hidden_sizes[-1], image_size / 32-ish, ...), read it off a forward.
    """
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    if len(hidden_sizes) != len(depths):
        raise BadInputError("hidden_sizes and depths must have the same length")
    kwargs = dict(hidden_sizes=list(hidden_sizes), depths=list(depths), image_size=image_size, seed=seed)
    out = _prepare_dir(out_dir)
    config = ResNetConfig(
        embedding_size=hidden_sizes[0],
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        layer_type="basic",
    )
    with _seeded(seed):
        model = ResNetModel(config)
    processor = ConvNextImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        crop_pct=0.875,
        resample=3,
        do_rescale=True,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    _write_marker(out, "resnet", kwargs)
    return out


def _bpe(words: Iterable[str], style: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny byte-level BPE (vocab, merges): every byte as a token plus whole-word merges.

    ``style="clip"``: word-final pieces end in ``</w>`` (CLIP); ``"roberta"``: words start with ``Ġ``
    (GPT-2 / RoBERTa). Special tokens are added by the callers."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for t in chars + ([c + "</w>" for c in chars] if style == "clip" else []):
        vocab.setdefault(t, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in dict.fromkeys(w.strip().lower() for w in words if w.strip() and w.isascii()):
        pieces = list(w[:-1]) + [w[-1] + "</w>"] if style == "clip" else ["\u0120"] + list(w)
        cur = pieces[0]
        for piece in pieces[1:]:
            if cur + piece not in vocab:
                merges.append((cur, piece))
                vocab[cur + piece] = len(vocab)
            cur += piece
    return vocab, merges


def build_roberta(out_dir: str | Path, *, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                  vocab_words: Iterable[str] | None = None, seed: int = 0) -> Path:
    """A random ``RobertaModel`` + byte-level BPE ``RobertaTokenizer``: ``<s> ... </s>``, no token type ids."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    kwargs = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                  vocab_words=list(vocab_words or ()), seed=seed)
    out = _prepare_dir(out_dir)
    bpe, merges = _bpe([*DEFAULT_WORDS, *kwargs["vocab_words"]], "roberta")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for t in bpe:
        vocab.setdefault(t, len(vocab))
    vocab["<mask>"] = len(vocab)
    tok = RobertaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
                           max_position_embeddings=514, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, type_vocab_size=1)
    with _seeded(seed):
        model = RobertaModel(config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _write_marker(out, "roberta", kwargs)
    return out


def _clip_tokenizer(words: Iterable[str]):
    from transformers import CLIPTokenizer

    vocab, merges = _bpe(words, "clip")
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def build_clip(out_dir: str | Path, *, text_hidden: int = 32, vision_hidden: int = 24, projection_dim: int = 16,
               num_layers: int = 2, num_heads: int = 2, text_heads: int | None = None, patch_size: int = 8,
               image_size: int = 32, max_position: int = 77, tokenizer: bool = True, seed: int = 0) -> Path:
    """A whole random two-tower ``CLIPModel`` + ``CLIPImageProcessor`` (+ a byte-level BPE
    ``CLIPTokenizer`` unless ``tokenizer=False``: an image-only folder, as some users save).
    ``text_heads`` defaults to ``num_heads`` (the vision tower's)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    kwargs = dict(text_hidden=text_hidden, vision_hidden=vision_hidden, projection_dim=projection_dim,
                  num_layers=num_layers, num_heads=num_heads, text_heads=text_heads, patch_size=patch_size,
                  image_size=image_size, max_position=max_position, tokenizer=tokenizer, seed=seed)
    out = _prepare_dir(out_dir)
    tok = _clip_tokenizer(DEFAULT_WORDS)
    config = CLIPConfig(
        text_config=dict(hidden_size=text_hidden, intermediate_size=4 * text_hidden, vocab_size=len(tok),
                         max_position_embeddings=max_position, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, num_hidden_layers=num_layers,
                         num_attention_heads=text_heads or num_heads),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, image_size=image_size,
                           patch_size=patch_size, num_hidden_layers=num_layers, num_attention_heads=num_heads),
        projection_dim=projection_dim)
    with _seeded(seed):
        model = CLIPModel(config).eval()
    model.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276]).save_pretrained(out)
    if tokenizer:
        tok.save_pretrained(out)
    _write_marker(out, "clip", kwargs)
    return out


def build_siglip(out_dir: str | Path, *, text_hidden: int = 32, vision_hidden: int = 24, num_layers: int = 2,
                 num_heads: int = 2, patch_size: int = 8, image_size: int = 32, max_position: int = 16,
                 seed: int = 0) -> Path:
    """A whole random two-tower ``SiglipModel`` + ``SiglipImageProcessor`` (resize to ``image_size``
    square, mean/std 0.5). Its tokenizer is the tiny WordPiece one: SigLIP's own needs sentencepiece,
    and the text adapter does not depend on the tokenizer's kind."""
    from transformers import BertTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    kwargs = dict(text_hidden=text_hidden, vision_hidden=vision_hidden, num_layers=num_layers, num_heads=num_heads,
                  patch_size=patch_size, image_size=image_size, max_position=max_position, seed=seed)
    out = _prepare_dir(out_dir)
    vocab_path = out / "vocab.txt"
    vocab_path.write_text("\n".join(make_vocab()) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(vocab_path), do_lower_case=True, model_max_length=max_position)
    tower = dict(num_hidden_layers=num_layers, num_attention_heads=num_heads)
    config = SiglipConfig(
        text_config=dict(hidden_size=text_hidden, intermediate_size=4 * text_hidden, vocab_size=len(tok),
                         max_position_embeddings=max_position, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, **tower),
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, image_size=image_size,
                           patch_size=patch_size, **tower))
    with _seeded(seed):
        model = SiglipModel(config).eval()
    model.save_pretrained(out)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(out)
    tok.save_pretrained(out)
    _write_marker(out, "siglip", kwargs)
    return out


#: Keyword arguments for :func:`build_bert` / :func:`build_dinov2` per preset size. "base" has the
#: shapes of bert-base-uncased and dinov2-base (random weights: ~110M + ~86M parameters, ~800 MB).
#: "clip-base" / "siglip-base" are one two-tower checkpoint used as both text and image model, with
#: the shapes of openai/clip-vit-base-patch32 and google/siglip-base-patch16-224 (random weights).
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "bert": dict(hidden_size=32, num_layers=2, num_heads=2),
        "dinov2": dict(hidden_size=32, num_layers=2, num_heads=2, patch_size=8, image_size=64),
    },
    "small": {
        "bert": dict(hidden_size=256, num_layers=4, num_heads=4),
        "dinov2": dict(hidden_size=384, num_layers=4, num_heads=6, patch_size=14, image_size=224,
                       resize_shortest_edge=256),
    },
    "base": {
        "bert": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
        "dinov2": dict(hidden_size=768, num_layers=12, num_heads=12, patch_size=14, image_size=224,
                       resize_shortest_edge=256),
    },
    "clip-base": {
        "clip": dict(text_hidden=512, vision_hidden=768, projection_dim=512, num_layers=12, num_heads=12,
                     text_heads=8, patch_size=32, image_size=224, max_position=77),
    },
    "siglip-base": {
        "siglip": dict(text_hidden=768, vision_hidden=768, num_layers=12, num_heads=12, patch_size=16,
                       image_size=224, max_position=64),
    },
}


def is_complete(folder: Path, kind: str, kwargs: dict) -> bool:
    marker = folder / MARKER_NAME
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    want = json.loads(json.dumps({"kind": kind, "kwargs": kwargs}, sort_keys=True, default=list))
    return meta == want


def build_preset(name: str, root: str | Path) -> tuple[Path, Path]:
    """Build (or reuse) the text and image checkpoints of preset ``name`` under ``root``.

    Returns ``(root / "bert-<name>", root / "dinov2-<name>")``, or twice the one two-tower folder
    (``root / "clip-base"``) of a two-tower preset. Idempotent: a folder whose completion
    marker (written last) matches the preset's arguments is reused; a folder without one (an
    interrupted build) or with other arguments is wiped and rebuilt.
    """
    if name not in PRESETS:
        raise BadInputError(f"unknown tiny-model preset {name!r}; choose one of {sorted(PRESETS)}")
    root = Path(root)
    dirs = []
    builders = {"bert": build_bert, "dinov2": build_dinov2, "clip": build_clip, "siglip": build_siglip}
    for kind in PRESETS[name]:
        builder = builders[kind]
        kwargs = dict(PRESETS[name][kind])
        folder = root / (name if kind in ("clip", "siglip") else f"{kind}-{name}")
        full = full_kwargs(builder, kwargs)
        if is_complete(folder, kind, full):
            log.info("reusing %s", folder)
        else:
            if folder.exists():
                log.info("rebuilding incomplete or outdated %s", folder)
                shutil.rmtree(folder)
            builder(folder, **kwargs)
        dirs.append(folder)
    return dirs[0], dirs[-1]


def full_kwargs(builder, kwargs: dict) -> dict:
    """The builder's keyword defaults overlaid with ``kwargs``, as the builder records them."""
    import inspect

    full = {
        k: p.default
        for k, p in inspect.signature(builder).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    full.update(kwargs)
    if "vocab_words" in full:
        full["vocab_words"] = list(full["vocab_words"] or ())
    return full
