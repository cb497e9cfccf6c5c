"""Encoder-only text transformers whose ``cls`` is the first token's state.

* ``bert``: BERT-family checkpoints ([CLS] ... [SEP], token type ids left at 0).
* ``text-transformer``: RoBERTa / XLM-R / CamemBERT / DeBERTa(-v2/v3) / MPNet / ModernBERT-style
  encoders and sentence-embedding checkpoints built on them (``<s>`` ... ``</s>``, no token type ids).

Both run the plain ``AutoModel`` (no pooler head) on ``input_ids`` + ``attention_mask``.
"""

from __future__ import annotations

from mmcache.extract.adapters.base import TextAdapter, register_encoder

TEXT_POOLING = {
    "cls": "last_hidden_state[:, 0] -- the raw first ([CLS]) token, not the pooler head",
    "mean": "mean of last_hidden_state over positions with attention_mask True (incl. [CLS]/[SEP])",
    "tokens": "last_hidden_state, padded to the longest text in the batch; mask True = real token",
}


@register_encoder
class BertText(TextAdapter):
    name = "bert"
    description = "BERT-family encoders; cls = the raw [CLS] state"
    model_types = ("bert", "distilbert", "electra", "albert", "megatron-bert", "ernie", "mobilebert",
                   "convbert", "roformer", "squeezebert")
    pooling = TEXT_POOLING
    first_token = True


@register_encoder
class GenericText(TextAdapter):
    name = "text-transformer"
    description = "RoBERTa / XLM-R / DeBERTa-v2 / MPNet / ModernBERT-style encoders; cls = the first (<s>) state"
    model_types = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "deberta", "deberta-v2", "mpnet",
                   "modernbert", "data2vec-text", "longformer", "nomic_bert", "xmod")
    pooling = {
        "cls": "last_hidden_state[:, 0] -- the raw first token (<s> or [CLS]), not a pooler head",
        "mean": "mean of last_hidden_state over positions with attention_mask True (special tokens included)",
        "tokens": "last_hidden_state, padded to the longest text in the batch; mask True = real token",
    }
    first_token = True
