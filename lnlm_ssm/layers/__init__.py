"""nn.Modules built from lnlm_ssm.ops: the mixers and MLP a MambaLM block holds.

Every mixer (Mamba, Mamba2, Attention) keeps one contract, so that a model can
stack them without knowing which is which:

``__init__(d_model, ..., layer_idx=None, device=None, dtype=None, backend="auto")``
    Argument names as in mamba_ssm. ``backend`` is passed to every op call.

``forward(hidden_states, cache=None, *, mask=None, position_ids=None) -> Tensor``
    ``hidden_states`` (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    - ``cache``: the object ``allocate_cache`` returned. Without it the layer
      runs the full-sequence (chunked) path from a zero state. With it, the
      call continues from the cached state and updates the cache in place:
      seqlen == 1 takes the single-step decode path, seqlen > 1 the chunked
      path started from the cached state (chunked prefill).
    - ``mask``: (batch, past + seqlen) with True/1 for real tokens and
      False/0 for padding, where ``past`` is the number of positions the cache
      has seen (0 without a cache). Padding is on the left. Padded positions
      must leave no trace: an SSM layer zeroes its conv input and its scan input
      at padded positions, so states stay exactly zero until the first real
      token; attention never attends to a padded key.
    - ``position_ids``: (batch, seqlen) positions for RoPE (attention only;
      SSM layers ignore it). Default: ``past + arange(seqlen)``.

``allocate_cache(batch_size, max_seqlen, *, device=None, dtype=None)``
    Allocates this layer's inference state once (zeros):
    Mamba ``MambaCache(conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state))``;
    Mamba2 ``Mamba2Cache(conv_state (batch, conv_dim, d_conv), ssm_state (batch, nheads, headdim, d_state))``;
    Attention ``AttentionCache(k, v (batch, max_seqlen, num_heads_kv, head_dim), seqlen)``.
    SSM states are kept in fp32; conv states and KV in ``dtype``. Each cache
    object has ``reset()`` (zero in place) and counts ``seqlen``, the
    positions it has seen.

Parameter names follow mamba_ssm's checkpoint layout exactly, so that its
state dicts load without renaming.
"""

from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.cache import AttentionCache, Mamba2Cache, MambaCache
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2
from lnlm_ssm.layers.mlp import GatedMLP
from lnlm_ssm.layers.norm import RMSNorm
