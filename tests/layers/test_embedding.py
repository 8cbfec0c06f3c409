"""Token ids are checked once, in the embedding, for every model and every entry point."""

import pytest
import torch

from lnlm_ssm.layers import TokenEmbedding
from lnlm_ssm.models import MambaLM


def test_valid_ids_look_up_rows():
    embedding = TokenEmbedding(10, 16, 4)
    ids = torch.tensor([[0, 9, 3]])
    torch.testing.assert_close(embedding(ids), embedding.weight[ids])
    assert embedding.weight.shape == (16, 4)


@pytest.mark.parametrize("bad", [10, 15, -1, 10**6])
def test_ids_outside_the_vocabulary_name_the_value_and_the_size(bad):
    # 10..15 are padding rows of the table: before the check they returned logits silently.
    embedding = TokenEmbedding(10, 16, 4)
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, vocab_size=10\); got the id {bad}"):
        embedding(torch.tensor([[1, bad, 2]]))


def test_ids_must_be_integers():
    with pytest.raises(TypeError, match="input_ids must be an int32/int64 tensor; got dtype torch.float32"):
        TokenEmbedding(10, 16, 4)(torch.zeros(1, 3))


def test_models_and_generation_check_ids_through_the_embedding():
    model = MambaLM.from_name("mamba-tiny", n_layer=1)  # vocab 257, padded to 264
    assert model.backbone.embedding.vocab_size == 257
    for entry in (lambda ids: model(ids), lambda ids: model.generate(ids, max_new_tokens=2, repetition_penalty=1.2)):
        for bad in (257, 263, -3):
            with pytest.raises(ValueError, match=f"vocab_size=257\\); got the id {bad}"):
                entry(torch.tensor([[5, bad]]))


def test_compiled_embedding_checks_without_a_host_sync():
    # Under torch.compile the check is torch._assert_async (as on accelerators): no .item() in the graph.
    embedding = TokenEmbedding(10, 16, 4)
    compiled = torch.compile(embedding, fullgraph=True, backend="eager")
    ids = torch.tensor([[1, 2]])
    torch.testing.assert_close(compiled(ids), embedding.weight[ids])
    with pytest.raises(RuntimeError):
        compiled(torch.tensor([[1, 12]]))
