"""HF transformers' ELECTRA (model_type "electra"): ``ElectraForMaskedLM`` (the generator) as a MaskedLM,
``ElectraForPreTraining`` (the discriminator) as a ReplacedTokenDetector, ``ElectraModel`` as an Encoder,
``ElectraForSequenceClassification`` / ``ElectraForTokenClassification`` as our classifiers.

BERT's layer layout (``checkpoint.convert.hf_bert``); the embeddings are
``embedding_size`` wide and mapped to ``hidden_size`` by ``embeddings_project``
when the two differ; no pooler. The generator's head is dense -> GELU ->
LayerNorm -> the tied ``generator_lm_head``; the discriminator's dense ->
``hidden_act`` -> one logit. The sequence classifier's head is RoBERTa's with GELU
for tanh (dense -> GELU -> out_proj on the first token); the token classifier's, BERT's.
"""

from __future__ import annotations

from typing import Any

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.convert.hf_bert import bert_state, classifier_fields, encoder_fields, linear_keys, mlm_head_keys
from lnlm_ssm.checkpoint.convert.hf_roberta import SEQUENCE_HEAD_KEYS

LAYOUT = "HF electra"

_PROJECT = {"embeddings_project.weight": "embedding_proj.weight", "embeddings_project.bias": "embedding_proj.bias"}


def _config(raw: dict[str, Any]) -> dict[str, Any]:
    fields = encoder_fields(raw, LAYOUT)
    size = require(raw, "embedding_size", LAYOUT)
    # HF ELECTRA maps the embeddings to hidden_size only when the widths differ.
    return {**fields, "embedding_size": None if size == fields["d_model"] else size}


def _generator_config(raw: dict[str, Any]) -> dict[str, Any]:
    return {**_config(raw), "head_act": "gelu"}


GENERATOR = Converter(
    layout=LAYOUT,
    model_type="electra",
    architectures=("ElectraForMaskedLM",),
    config=_generator_config,
    state=bert_state(
        "electra.", "encoder.",
        mlm_head_keys("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head"),
        layout=LAYOUT,
        top=_PROJECT,
    ),
)
DISCRIMINATOR = Converter(
    layout=LAYOUT,
    model_type="electra",
    architectures=("ElectraForPreTraining",),
    config=_config,
    state=bert_state(
        "electra.", "encoder.",
        {f"discriminator_predictions.{hf}.{p}": f"rtd_head.{ours}.{p}"
         for hf, ours in (("dense", "dense"), ("dense_prediction", "out")) for p in ("weight", "bias")},
        layout=LAYOUT,
        top=_PROJECT,
    ),
)
BARE = Converter(
    layout=LAYOUT, model_type="electra", architectures=("ElectraModel",), config=_config,
    state=bert_state("", "", {}, layout=LAYOUT, top=_PROJECT),
)
SEQUENCE_CLASSIFIER = Converter(
    layout=LAYOUT,
    model_type="electra",
    architectures=("ElectraForSequenceClassification",),
    config=lambda raw: {**classifier_fields(raw, _config(raw), pooler=True), "pooler_act": "gelu"},
    state=bert_state("electra.", "backbone.", SEQUENCE_HEAD_KEYS, layout=LAYOUT, top=_PROJECT),
)
TOKEN_CLASSIFIER = Converter(
    layout=LAYOUT,
    model_type="electra",
    architectures=("ElectraForTokenClassification",),
    config=lambda raw: classifier_fields(raw, _config(raw), pooler=False),
    state=bert_state("electra.", "backbone.", linear_keys("classifier", "score"), layout=LAYOUT, top=_PROJECT),
)
