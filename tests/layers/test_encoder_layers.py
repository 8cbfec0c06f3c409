"""The encoder's layers: the plain MLP, BERT's embedding, and bidirectional attention with a right-padded key mask."""

import math

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.embedding import EncoderEmbedding
from lnlm_ssm.layers.mlp import MLP
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


def gelu_tanh_formula(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("activation, formula", [("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
                                                 ("gelu_new", gelu_tanh_formula), ("relu", F.relu)])
def test_mlp_formula(activation, formula):
    mlp = MLP(6, 10, out_features=4, activation=activation, dtype=f64)
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        mlp.fc2.bias.normal_()
    x = torch.randn(2, 3, 6, dtype=f64)
    expected = formula(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    assert_close(mlp(x), expected)
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        "fc1.weight": (10, 6), "fc1.bias": (10,), "fc2.weight": (4, 10), "fc2.bias": (4,)
    }


def test_mlp_errors():
    with pytest.raises(ValueError, match="activation must be one of .*got 'tanhh'"):
        MLP(4, 8, activation="tanhh")
    with pytest.raises(ValueError, match="hidden_features must be a positive integer"):
        MLP(4, 0)


def test_encoder_embedding_formula():
    emb = EncoderEmbedding(11, 8, max_positions=7, type_vocab_size=2, norm_eps=1e-6, dtype=f64)
    with torch.no_grad():
        emb.norm.weight.normal_()
        emb.norm.bias.normal_()
    ids = torch.tensor([[1, 2, 3, 10], [4, 5, 0, 0]])
    types = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    positions = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 6]])
    summed = emb.token.weight[ids] + emb.position.weight[positions] + emb.token_type.weight[types]
    expected = F.layer_norm(summed, (8,), emb.norm.weight, emb.norm.bias, eps=1e-6)
    assert_close(emb(ids, positions, types), expected)
    # Defaults: positions 0..seqlen-1, token type 0.
    plain = F.layer_norm(
        emb.token.weight[ids] + emb.position.weight[:4] + emb.token_type.weight[0], (8,), emb.norm.weight,
        emb.norm.bias, eps=1e-6,
    )
    assert_close(emb(ids), plain)


def test_encoder_embedding_without_tables():
    emb = EncoderEmbedding(11, 8, norm_eps=None)
    assert list(emb.state_dict()) == ["token.weight"]
    ids = torch.tensor([[1, 2]])
    assert torch.equal(emb(ids), emb.token.weight[ids])
    with pytest.raises(ValueError, match="position_ids were given but this embedding has no position table"):
        emb(ids, position_ids=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="token_type_ids were given but this embedding has no token type table"):
        emb(ids, token_type_ids=torch.tensor([[0, 1]]))


def test_encoder_embedding_checks_ids():
    emb = EncoderEmbedding(11, 8, max_positions=4, type_vocab_size=2)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, max_position_embeddings=4\); got the id 4"):
        emb(ids)
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, type_vocab_size=2\)"):
        emb(ids[:, :3], token_type_ids=torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="token_type_ids must have the shape of input_ids"):
        emb(ids[:, :3], token_type_ids=torch.tensor([[0, 1]]))


def attention_formula(attn, x, mask):
    """softmax(q k^T / sqrt(d) + mask) v per head, written out: every query sees every real key."""
    batch, seqlen, _ = x.shape
    q, k, v = (x @ attn.in_proj.weight.T + attn.in_proj.bias).chunk(3, dim=-1)
    q, k, v = (t.view(batch, seqlen, attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seqlen, -1)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def test_bidirectional_attention_with_a_right_padded_key_mask():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, causal=False, dtype=f64)
    with torch.no_grad():
        attn.in_proj.bias.normal_()
        attn.out_proj.bias.normal_()
    x = torch.randn(2, 6, 16, dtype=f64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out = attn(x, mask=mask)
    real = mask
    assert_close(out[real], attention_formula(attn, x, mask)[real])
    # The padded row's real positions are the row alone; what the pad keys hold does not matter.
    x2 = x.clone()
    x2[1, 4:] = 100.0
    assert_close(attn(x2, mask=mask)[1, :4], attn(x[1:, :4])[0])
    assert torch.isfinite(out).all()
    # Without a mask, the first query sees the last key (no causal mask).
    changed = x.clone()
    changed[:, -1] += 1
    assert not torch.allclose(attn(changed)[:, 0], attn(x)[:, 0])
