"""HF transformers' ALBERT (model_type "albert"): ``AlbertForMaskedLM`` as a MaskedLM, ``AlbertForPreTraining``
as a SentenceOrderMaskedLM, ``AlbertModel`` as an Encoder, ``AlbertForSequenceClassification`` /
``AlbertForTokenClassification`` as our classifiers (BERT's heads: the pooler, then ``classifier``).

ALBERT's embeddings are ``embedding_size`` wide and always mapped to
``hidden_size`` (``encoder.embedding_hidden_mapping_in``); its
``num_hidden_groups`` groups of ``inner_group_num`` layers
(``encoder.albert_layer_groups.G.albert_layers.J``) are our blocks
``G * inner_group_num + J``, shared by the layers as EncoderConfig describes.
Within a layer the names differ from BERT's, not the computation.
"""

from __future__ import annotations

import re
from typing import Any

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.convert.hf_bert import (
    EMBEDDING_KEYS,
    classifier_fields,
    decoder_bias_first,
    encoder_fields,
    encoder_state,
    linear_keys,
    mlm_head_keys,
)

LAYOUT = "HF albert"

_LAYER = re.compile(r"encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.(.+)")
_LAYER_KEYS = {
    "attention.dense": "mixer.out_proj",
    "attention.LayerNorm": "norm",
    "ffn": "mlp.fc1",
    "ffn_output": "mlp.fc2",
    "full_layer_layer_norm": "norm2",
}
_QKV = ("attention.query", "attention.key", "attention.value")
_TOP = {
    **EMBEDDING_KEYS,
    "encoder.embedding_hidden_mapping_in.weight": "embedding_proj.weight",
    "encoder.embedding_hidden_mapping_in.bias": "embedding_proj.bias",
    "pooler.weight": "pooler.dense.weight",
    "pooler.bias": "pooler.dense.bias",
}
_MLM_HEAD = mlm_head_keys("predictions.dense", "predictions.LayerNorm", "predictions.decoder", "predictions.bias")
_SOP_HEAD = {"sop_classifier.classifier.weight": "sop_head.weight", "sop_classifier.classifier.bias": "sop_head.bias"}


def _config(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        **encoder_fields(raw, LAYOUT),
        "embedding_size": require(raw, "embedding_size", LAYOUT),
        "num_hidden_groups": require(raw, "num_hidden_groups", LAYOUT),
        "inner_group_num": require(raw, "inner_group_num", LAYOUT),
    }


def _bare_config(raw: dict[str, Any]) -> dict[str, Any]:
    return {**_config(raw), "add_pooler": True}


def _state(prefix: str, ours: str, heads: dict[str, str], unused: tuple[str, ...] = ()):
    def state(raw_state, fields):
        inner = fields.get("backbone", fields)["inner_group_num"]  # a classifier's encoder is its backbone
        return encoder_state(
            raw_state, layout=LAYOUT, prefix=prefix, ours=ours, top=_TOP, layer=_LAYER, layer_keys=_LAYER_KEYS,
            qkv=_QKV, heads=heads, unused=unused, block_index=lambda m: int(m.group(1)) * inner + int(m.group(2)),
        )

    return decoder_bias_first(state, "predictions.decoder.bias", "predictions.bias")


MLM = Converter(
    layout=LAYOUT, model_type="albert", architectures=("AlbertForMaskedLM",), config=_config,
    # AlbertForMaskedLM has no pooler, whose weights albert-base-v2 carries.
    state=_state("albert.", "encoder.", _MLM_HEAD, unused=("albert.pooler.", "sop_classifier.")),
)
PRETRAINING = Converter(
    layout=LAYOUT, model_type="albert", architectures=("AlbertForPreTraining",), config=_config,
    state=_state("albert.", "encoder.", {**_MLM_HEAD, **_SOP_HEAD}),
)
BARE = Converter(
    layout=LAYOUT, model_type="albert", architectures=("AlbertModel",), config=_bare_config,
    state=_state("", "", {}),
)
SEQUENCE_CLASSIFIER = Converter(
    layout=LAYOUT,
    model_type="albert",
    architectures=("AlbertForSequenceClassification",),
    config=lambda raw: classifier_fields(raw, _config(raw), pooler=True),
    state=_state("albert.", "backbone.", {**linear_keys("albert.pooler", "pooler.dense"), **linear_keys("classifier", "score")}),
)
TOKEN_CLASSIFIER = Converter(
    layout=LAYOUT,
    model_type="albert",
    architectures=("AlbertForTokenClassification",),
    config=lambda raw: classifier_fields(raw, _config(raw), pooler=False),
    state=_state("albert.", "backbone.", linear_keys("classifier", "score")),
)
