"""HF transformers' BERT (model_type "bert"): ``BertForMaskedLM`` as a MaskedLM, ``BertModel`` as an Encoder,
``BertForSequenceClassification`` / ``BertForTokenClassification`` as our classifiers.

Also what the BERT-like layouts share (RoBERTa and ELECTRA name their layers as
BERT does, ALBERT its own way): the config fields and the key mapping, with the
query, key and value projections concatenated into our ``mixer.in_proj`` (rows
[q, k, v]).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.load import CheckpointError
from lnlm_ssm.layers.mlp import ACTIVATIONS

LAYOUT = "HF bert"

# HF encoder config fields that describe a model we do not build, and the value we can build.
_UNSUPPORTED = {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}


def encoder_fields(raw: dict[str, Any], layout: str) -> dict[str, Any]:
    """Our EncoderConfig fields from the fields every HF BERT-like config.json has."""
    for name, supported in _UNSUPPORTED.items():
        if raw.get(name, supported) != supported:
            raise CheckpointError(
                f"config.json of a {layout} checkpoint has {name}={raw[name]!r}; only {name}={supported!r} "
                "(a bidirectional encoder with learned absolute positions) is supported"
            )
    act = require(raw, "hidden_act", layout)
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"config.json of a {layout} checkpoint has hidden_act {act!r}; supported: {sorted(ACTIVATIONS)}"
        )
    pad = raw.get("pad_token_id")
    return dict(
        vocab_size=require(raw, "vocab_size", layout),
        d_model=require(raw, "hidden_size", layout),
        n_layer=require(raw, "num_hidden_layers", layout),
        num_heads=require(raw, "num_attention_heads", layout),
        d_intermediate=require(raw, "intermediate_size", layout),
        hidden_act=act,
        max_position_embeddings=require(raw, "max_position_embeddings", layout),
        type_vocab_size=require(raw, "type_vocab_size", layout),
        layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
        pad_token_id=0 if pad is None else pad,
        hidden_dropout=raw.get("hidden_dropout_prob", 0.1),
        head_act=act,
        tie_embeddings=raw.get("tie_word_embeddings", True),
        layer_pattern="A",
        prenorm=False,
    )


# HF name after the model prefix -> ours after "encoder." (or nothing, for the bare model).
EMBEDDING_KEYS = {
    "embeddings.word_embeddings.weight": "embeddings.token.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
}
_TF_NORM_NAMES = re.compile(r"((?:LayerNorm|layer_norm)\.)(gamma|beta)$")
_TF_NORM_PARAMS = {"gamma": "weight", "beta": "bias"}
# Buffers older transformers saved; they follow from the config.
_DERIVED = ("embeddings.position_ids", "embeddings.token_type_ids")
BERT_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
BERT_LAYER_KEYS = {
    "attention.output.dense": "mixer.out_proj",
    "attention.output.LayerNorm": "norm",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
BERT_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")


def encoder_state(
    state: dict[str, torch.Tensor],
    *,
    layout: str,
    prefix: str,
    ours: str,
    top: Mapping[str, str],
    layer: re.Pattern,
    layer_keys: Mapping[str, str],
    qkv: tuple[str, str, str],
    heads: Optional[Mapping[str, str]] = None,
    unused: tuple[str, ...] = (),
    block_index=lambda match: int(match.group(1)),
) -> dict[str, torch.Tensor]:
    """A BERT-like state dict with our names.

    - ``prefix``: the encoder's HF prefix ("bert.", or "" for the bare model); ``ours``: ours ("encoder." or "");
    - ``top``: HF name after the prefix -> ours after ``ours`` (embeddings, projection, pooler);
    - ``layer``: matches a layer key after the prefix, its last group the name inside the layer;
      ``block_index(match)``: our block of that layer; ``layer_keys``: HF module -> ours inside a block;
    - ``qkv``: the HF query, key and value modules, concatenated into ``mixer.in_proj``;
    - ``heads``: full HF key -> full key of ours, for the heads;
    - ``unused``: prefixes of keys the HF architecture itself does not use (the pooler and
      pre-training heads that bert-base-uncased's BertForMaskedLM weights carry), dropped.

    Keys none of these know are passed on for the strict check to report. LayerNorm
    parameters saved under TensorFlow's names (``gamma``, ``beta``: the original BERT
    releases) are read as ``weight`` and ``bias``, as transformers does.
    """
    heads = heads or {}
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in state.items():
        if key.startswith(unused):
            continue
        key = _TF_NORM_NAMES.sub(lambda m: m.group(1) + _TF_NORM_PARAMS[m.group(2)], key)
        if key in heads:
            out[heads[key]] = t
            continue
        rest = key[len(prefix):] if key.startswith(prefix) else None
        match = None if rest is None else layer.fullmatch(rest)
        if rest in top:
            out[ours + top[rest]] = t
        elif rest in _DERIVED:
            continue
        elif match is not None:
            module, _, param = match.group(match.lastindex).rpartition(".")
            block = block_index(match)
            if module in qkv:
                parts.setdefault((block, param), {})[qkv.index(module)] = t
            elif module in layer_keys:
                out[f"{ours}layers.{block}.{layer_keys[module]}.{param}"] = t
            else:
                out[key] = t
        else:
            out[key] = t
    for (block, param), found in parts.items():
        if len(found) != 3:
            missing = [qkv[i] for i in range(3) if i not in found]
            raise CheckpointError(f"the {layout} checkpoint's block {block} lacks {missing} {param} (it has the others)")
        out[f"{ours}layers.{block}.mixer.in_proj.{param}"] = torch.cat([found[i] for i in range(3)], dim=0)
    return out


def bert_state(
    prefix: str,
    ours: str,
    heads: Mapping[str, str],
    layout: str = LAYOUT,
    top: Optional[Mapping[str, str]] = None,
    unused: tuple[str, ...] = (),
):
    """The ``state`` function of a BERT-layout converter (BERT, RoBERTa, ELECTRA); arguments as ``encoder_state``'s."""

    def state(raw_state: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        return encoder_state(
            raw_state, layout=layout, prefix=prefix, ours=ours, top={**EMBEDDING_KEYS, **(top or {})}, layer=BERT_LAYER,
            layer_keys=BERT_LAYER_KEYS, qkv=BERT_QKV, heads=heads, unused=unused,
        )

    return state


def mlm_head_keys(dense: str, norm: str, decoder: str, head_bias: Optional[str] = None) -> dict[str, str]:
    """HF names of an MLM head's modules ``dense``, ``norm``, ``decoder`` (and its bias as the head's own
    ``head_bias`` parameter, where HF keeps one) -> ours."""
    keys = {
        f"{dense}.weight": "mlm_head.dense.weight",
        f"{dense}.bias": "mlm_head.dense.bias",
        f"{norm}.weight": "mlm_head.norm.weight",
        f"{norm}.bias": "mlm_head.norm.bias",
        f"{decoder}.weight": "mlm_head.decoder.weight",
        f"{decoder}.bias": "mlm_head.decoder.bias",
    }
    if head_bias is not None:
        keys[head_bias] = "mlm_head.decoder.bias"
    return keys


def decoder_bias_first(state_fn, decoder_bias: str, head_bias: str):
    """``state_fn`` on a state dict holding one of ``decoder_bias`` and ``head_bias``: the decoder's, when saved.

    HF's MLM heads keep the decoder's bias twice, as ``decoder.bias`` (what the
    forward adds) and as the head's ``bias``, tied to it with tied embeddings:
    then only the head's is saved, and without the tie both are.
    """

    def state(raw_state: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        if decoder_bias in raw_state:
            raw_state = {k: t for k, t in raw_state.items() if k != head_bias}
        return state_fn(raw_state, fields)

    return state


def _bert_mlm_config(raw: dict[str, Any]) -> dict[str, Any]:
    return encoder_fields(raw, LAYOUT)


def _bert_bare_config(raw: dict[str, Any]) -> dict[str, Any]:
    return {**encoder_fields(raw, LAYOUT), "add_pooler": True}


_POOLER = {"pooler.dense.weight": "pooler.dense.weight", "pooler.dense.bias": "pooler.dense.bias"}

MLM = Converter(
    layout=LAYOUT,
    model_type="bert",
    architectures=("BertForMaskedLM",),
    config=_bert_mlm_config,
    state=decoder_bias_first(
        bert_state(
            "bert.",
            "encoder.",
            mlm_head_keys(
                "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder",
                "cls.predictions.bias",
            ),
            unused=("bert.pooler.", "cls.seq_relationship."),
        ),
        "cls.predictions.decoder.bias",
        "cls.predictions.bias",
    ),
)
BARE = Converter(
    layout=LAYOUT, model_type="bert", architectures=("BertModel",), config=_bert_bare_config,
    state=bert_state("", "", {}, top=_POOLER),
)


def classifier_fields(raw: dict[str, Any], backbone: dict[str, Any], *, pooler: bool) -> dict[str, Any]:
    """ClassifierConfig fields of an HF ``*ForSequenceClassification`` / ``*ForTokenClassification`` config.json:
    its labels as HF stores them (num_labels is the size of ``id2label``), first-token pooling."""
    id2label = raw.get("id2label") or {"0": "LABEL_0", "1": "LABEL_1"}
    return dict(
        backbone=backbone,
        backbone_architecture="Encoder",
        num_labels=len(id2label),
        id2label={str(i): name for i, name in id2label.items()},
        label2id=dict(raw.get("label2id") or {}),
        pooling="first",
        pooler=pooler,
        problem_type=raw.get("problem_type"),
    )


def linear_keys(hf: str, ours: str) -> dict[str, str]:
    """The weight and bias names of the HF linear module ``hf`` -> ours."""
    return {f"{hf}.{p}": f"{ours}.{p}" for p in ("weight", "bias")}


SEQUENCE_CLASSIFIER = Converter(
    layout=LAYOUT,
    model_type="bert",
    architectures=("BertForSequenceClassification",),
    config=lambda raw: classifier_fields(raw, encoder_fields(raw, LAYOUT), pooler=True),
    state=bert_state(
        "bert.", "backbone.", {**linear_keys("bert.pooler.dense", "pooler.dense"), **linear_keys("classifier", "score")}
    ),
)
TOKEN_CLASSIFIER = Converter(
    layout=LAYOUT,
    model_type="bert",
    architectures=("BertForTokenClassification",),
    config=lambda raw: classifier_fields(raw, encoder_fields(raw, LAYOUT), pooler=False),
    state=bert_state("bert.", "backbone.", linear_keys("classifier", "score")),
)
