"""Weight-only quantisation of a model for inference: ``quantize_(model, "int8" | "bf16")``, in place.

Every ``nn.Linear`` (a mixer's in_proj, x_proj, dt_proj, out_proj, attention's
and the MLP's projections, the LM head) becomes a ``QuantizedLinear`` and the
token embedding a ``QuantizedEmbedding``, their weights stored in the formats of
``lnlm_ssm.ops.quantize_weight``: int8 with one fp32 scale per output row, or
bf16. Everything else stays as it was (fp32): norms, the conv, A, D, the dt and
projection biases; and so do the activations, the caches, the scan and the math
of every product (``weight_only_linear`` widens the weights to fp32 as it reads
them). Decoding reads each weight once per token, so it reads a quarter (int8)
or a half (bf16) of the bytes.

Tied weights stay tied: a weight shared by several modules (the embedding and
the LM head under ``tie_embeddings``) is quantised once and its tensors shared.
The embedding's rows are the head's output channels, so the one int8 matrix and
its per-row scales serve both the lookup and the head.

The quantised weights and scales are parameters that do not train
(``requires_grad=False``), so that ``.to()`` keeps ties as it does for float
weights and parameter counts include them. A quantised model is for inference:
a backward through any of its projections raises (``weight_only_linear``).

The mixers read their projections through :func:`project` (the decode kernels
for a step's few rows) and :func:`dense_weight` (the float matrix a prefill
multiplies by), which take either kind of linear.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lnlm_ssm.layers.embedding import TokenEmbedding, check_token_ids
from lnlm_ssm.ops import decode_linear, dequantize_weight, quantize_weight, weight_only_linear
from lnlm_ssm.ops.linear.reference import QUANTIZED_DTYPES
from lnlm_ssm.utils.checks import check_choice

QUANTIZATION_MODES = tuple(QUANTIZED_DTYPES)  # ("int8", "bf16")


def _frozen(tensor: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
    """``tensor`` as a parameter that does not train; a parameter as it is (the same object keeps a tie)."""
    if tensor is None or isinstance(tensor, nn.Parameter):
        return tensor
    return nn.Parameter(tensor, requires_grad=False)


def _mode_of(weight: torch.Tensor) -> str:
    return next(mode for mode, dtype in QUANTIZED_DTYPES.items() if dtype == weight.dtype)


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a weight-only quantised weight: ``x @ (weight_scale[:, None] * weight)^T + bias`` in fp32.

    ``weight`` (out, in): int8 with ``weight_scale`` (out,) fp32, or bf16 with
    ``weight_scale`` None, as ``lnlm_ssm.ops.quantize_weight`` returns them;
    ``bias`` (out,) fp32 or None.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight, self.weight_scale = _frozen(weight), _frozen(weight_scale)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)

    @property
    def mode(self) -> str:
        return _mode_of(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weight_only_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
            f"bias={self.bias is not None}"
        )


class QuantizedEmbedding(nn.Module):
    """``TokenEmbedding`` with a weight-only quantised table: rows of ``weight`` times ``weight_scale``, in fp32.

    ``weight`` (padded_vocab_size, embedding_dim): int8 with ``weight_scale``
    (padded_vocab_size,) fp32, or bf16 with ``weight_scale`` None. Ids are
    checked as ``TokenEmbedding`` checks them.
    """

    def __init__(self, vocab_size: int, weight: torch.Tensor, weight_scale: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight, self.weight_scale = _frozen(weight), _frozen(weight_scale)

    @property
    def mode(self) -> str:
        return _mode_of(self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(input_ids, self.vocab_size)
        rows = self.weight[input_ids].float()
        return rows if self.weight_scale is None else rows * self.weight_scale[input_ids, None]

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, shape={tuple(self.weight.shape)}, mode={self.mode}"


QUANTIZED_MODULES = (QuantizedLinear, QuantizedEmbedding)


def project(
    linear: nn.Module, x: torch.Tensor, backend: str = "auto", *, bias: bool = True, out_features: Optional[int] = None
) -> torch.Tensor:
    """``linear(x)`` of an ``nn.Linear`` or a ``QuantizedLinear``, through the kernels for a decode step's few rows.

    ``bias=False`` leaves the bias out (Mamba's dt_proj, whose bias the scan adds);
    ``out_features`` keeps only the first that many outputs (the LM head's real
    vocabulary), without computing the others.
    """
    weight, b = linear.weight, linear.bias if bias else None
    scale = linear.weight_scale if isinstance(linear, QuantizedLinear) else None
    if out_features is not None:
        weight = weight[:out_features]
        b = None if b is None else b[:out_features]
        scale = None if scale is None else scale[:out_features]
    if isinstance(linear, QuantizedLinear):
        return weight_only_linear(x, weight, scale, b, backend=backend)
    return decode_linear(x, weight, b, backend=backend)


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) float matrix of an ``nn.Linear``, or the fp32 one a ``QuantizedLinear``'s weight stands for."""
    if isinstance(linear, QuantizedLinear):
        return dequantize_weight(linear.weight, linear.weight_scale)
    return linear.weight


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype an ``nn.Linear`` / embedding computes in: its weight's, or fp32 once quantised."""
    return torch.float32 if isinstance(module, QUANTIZED_MODULES) else module.weight.dtype


def quantization_of(model: nn.Module) -> Optional[str]:
    """The mode ``quantize_`` gave ``model`` ("int8" or "bf16"), or None for a model it did not quantise."""
    return getattr(model, "quantization", None)


def quantize_(model: nn.Module, mode: str) -> nn.Module:
    """Quantise ``model``'s weights in place for inference (``mode`` "int8" or "bf16"); returns ``model``.

    Every ``nn.Linear`` and ``TokenEmbedding`` below ``model`` is replaced (see the
    module docstring); ``model.quantization`` records the mode, which
    ``save_pretrained`` writes to config.json so that ``from_pretrained`` rebuilds
    the quantised model (the quantised weights and scales are saved as they are). The model must be float32 (its activations and math stay
    fp32) and not quantised already. A backward through the quantised model raises.
    """
    check_choice("mode", mode, QUANTIZATION_MODES)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    given, model = model, getattr(model, "_orig_mod", model)  # torch.compile's wrapper: quantise what it wraps
    done = quantization_of(model) or next((m.mode for m in model.modules() if isinstance(m, QUANTIZED_MODULES)), None)
    if done is not None:
        raise ValueError(
            f"the model is quantised already ({done}): quantize_ takes a float32 model; "
            "load or build the float model again to quantise it another way"
        )
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, TokenEmbedding))]
    if any(name == "" for name, _ in targets):
        raise TypeError(
            f"model must hold the layers to quantise, not be one ({type(model).__name__}): quantize_ replaces "
            "submodules in place"
        )
    for name, m in targets:
        if m.weight.dtype != torch.float32:
            raise TypeError(
                f"quantize_ takes a float32 model (activations and math stay fp32); {name}.weight is "
                f"{m.weight.dtype}: build or load the model in float32 first"
            )
    # One quantisation per weight tensor: modules that share a weight (tied embeddings) share the result.
    quantized: dict[int, tuple[nn.Parameter, Optional[nn.Parameter]]] = {}
    for name, m in targets:
        key = id(m.weight)
        if key not in quantized:
            weight, scale = quantize_weight(m.weight, mode)
            quantized[key] = (_frozen(weight), _frozen(scale))
        weight, scale = quantized[key]
        if isinstance(m, TokenEmbedding):
            replacement = QuantizedEmbedding(m.vocab_size, weight, scale)
        else:
            replacement = QuantizedLinear(weight, scale, m.bias)
        model.set_submodule(name, replacement)
    model.quantization = mode
    return given
