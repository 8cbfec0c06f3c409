"""HF transformers' RoBERTa (model_type "roberta"): ``RobertaForMaskedLM`` as a MaskedLM, ``RobertaModel`` as an Encoder,
``RobertaForSequenceClassification`` / ``RobertaForTokenClassification`` as our classifiers.

BERT's layout (``checkpoint.convert.hf_bert``) but for two facts: positions
start at ``pad_token_id + 1`` and count only the non-pad tokens
(``position_offset``), and the MLM head's activation is GELU whatever
``hidden_act`` says.
"""

from __future__ import annotations

from typing import Any

from lnlm_ssm.checkpoint.convert import Converter
from lnlm_ssm.checkpoint.convert.hf_bert import (
    bert_state,
    classifier_fields,
    decoder_bias_first,
    encoder_fields,
    linear_keys,
    mlm_head_keys,
)

LAYOUT = "HF roberta"


def _mlm_config(raw: dict[str, Any]) -> dict[str, Any]:
    fields = encoder_fields(raw, LAYOUT)
    return {**fields, "position_offset": fields["pad_token_id"] + 1, "head_act": "gelu"}


def _bare_config(raw: dict[str, Any]) -> dict[str, Any]:
    return {**_mlm_config(raw), "add_pooler": True}


MLM = Converter(
    layout=LAYOUT,
    model_type="roberta",
    architectures=("RobertaForMaskedLM",),
    config=_mlm_config,
    state=decoder_bias_first(
        bert_state(
            "roberta.", "encoder.",
            mlm_head_keys("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias"),
            layout=LAYOUT,
            unused=("roberta.pooler.",),
        ),
        "lm_head.decoder.bias",
        "lm_head.bias",
    ),
)
BARE = Converter(
    layout=LAYOUT, model_type="roberta", architectures=("RobertaModel",), config=_bare_config,
    state=bert_state("", "", {}, layout=LAYOUT, top={"pooler.dense.weight": "pooler.dense.weight",
                                                      "pooler.dense.bias": "pooler.dense.bias"}),
)
# RoBERTa's sequence head is BERT's pooler moved into the head (classifier.dense, tanh) and its classifier
# (classifier.out_proj); the token head is BERT's. ELECTRA's sequence head has these names too.
SEQUENCE_HEAD_KEYS = {**linear_keys("classifier.dense", "pooler.dense"), **linear_keys("classifier.out_proj", "score")}
SEQUENCE_CLASSIFIER = Converter(
    layout=LAYOUT,
    model_type="roberta",
    architectures=("RobertaForSequenceClassification",),
    config=lambda raw: classifier_fields(raw, _mlm_config(raw), pooler=True),
    state=bert_state("roberta.", "backbone.", SEQUENCE_HEAD_KEYS, layout=LAYOUT),
)
TOKEN_CLASSIFIER = Converter(
    layout=LAYOUT,
    model_type="roberta",
    architectures=("RobertaForTokenClassification",),
    config=lambda raw: classifier_fields(raw, _mlm_config(raw), pooler=False),
    state=bert_state("roberta.", "backbone.", linear_keys("classifier", "score"), layout=LAYOUT),
)
