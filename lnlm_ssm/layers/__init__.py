"""nn.Modules built from lnlm_ssm.ops: the mixers, MLP, norms, embedding and inference caches a model stacks.

Every mixer (Mamba, Mamba2, Attention) subclasses ``layers.base.Mixer`` and keeps
its contract (documented there), so that a model can stack them without knowing
which is which. Parameter names follow mamba_ssm's checkpoint layout exactly.
"""

from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.base import Mixer, declared_parameter_names
from lnlm_ssm.layers.bidirectional import BiMamba, Hydra
from lnlm_ssm.layers.cache import AttentionCache, InferenceCache, Mamba2Cache, MambaCache
from lnlm_ssm.layers.embedding import EncoderEmbedding, TokenEmbedding
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2
from lnlm_ssm.layers.mlp import MLP, GatedMLP
from lnlm_ssm.layers.norm import LayerNorm, RMSNorm
from lnlm_ssm.layers.quantized import QuantizedEmbedding, QuantizedLinear, quantize_

__all__ = [
    "Attention",
    "AttentionCache",
    "BiMamba",
    "EncoderEmbedding",
    "GatedMLP",
    "Hydra",
    "InferenceCache",
    "LayerNorm",
    "MLP",
    "Mamba",
    "Mamba2",
    "Mamba2Cache",
    "MambaCache",
    "Mixer",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "RMSNorm",
    "TokenEmbedding",
    "declared_parameter_names",
    "quantize_",
]
