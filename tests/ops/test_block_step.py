"""The block steps (ops/block_step): the C++ kernels against the reference, and their checks.

The reference composes the reference ops; the kernel calls the C++ kernels the
unfused decode step calls (with decode_linear's kernel for 1-16 rows of inner
size >= 256 and the BLAS otherwise, both covered below), so outputs, new
residuals and updated states agree within the fp32 tolerance.
"""

import math

import pytest
import torch

from lnlm_ssm.ops import (
    attention_block_step,
    attention_block_step_ref,
    decode_step_ref,
    mamba2_block_step,
    mamba2_block_step_ref,
    mamba_block_step,
    mamba_block_step_ref,
    mlp_block_step,
    mlp_block_step_ref,
    prepare_block_step,
    prepare_decode_step,
    quantize_weight,
)
from lnlm_ssm.ops.block_step.cpu import mamba_block_step_cpu
from lnlm_ssm.ops.block_step.interface import NO_BACKWARD
from lnlm_ssm.utils.testing import assert_close


def rand(*shape, scale=0.3):
    return torch.randn(*shape) * scale


def norm_params(d_model, rms_norm):
    return (1 + rand(d_model), None if rms_norm else rand(d_model), 1e-5, rms_norm)


def mamba_params(batch, d_model, d_inner, *, d_state=16, dt_rank=8, width=4, rms_norm=True, biases=False):
    return norm_params(d_model, rms_norm) + (
        rand(2 * d_inner, d_model, scale=d_model**-0.5),
        rand(2 * d_inner) if biases else None,
        rand(d_inner, width),
        rand(d_inner) if biases else None,
        rand(batch, d_inner, width),  # conv_state
        rand(dt_rank + 2 * d_state, d_inner, scale=d_inner**-0.5),
        rand(d_inner, dt_rank, scale=dt_rank**-0.5),
        rand(d_inner) - 3,  # dt bias: softplus of it is small, as at init
        -torch.rand(d_inner, d_state) - 0.1,  # A
        rand(d_inner),
        rand(batch, d_inner, d_state),  # ssm_state
        rand(d_model, d_inner, scale=d_inner**-0.5),
        rand(d_model) if biases else None,
    )


def mamba2_params(batch, d_model, *, nheads=8, headdim=16, d_state=16, ngroups=1, width=4, D_per_head=True,
                  dt_limit=(0.0, math.inf), gate_norm=True, norm_before_gate=False, rms_norm=True, biases=False):
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    return norm_params(d_model, rms_norm) + (
        rand(d_inner + conv_dim + nheads, d_model, scale=d_model**-0.5),
        rand(d_inner + conv_dim + nheads) if biases else None,
        rand(conv_dim, width),
        rand(conv_dim) if biases else None,
        rand(batch, conv_dim, width),  # conv_state
        rand(nheads) - 3,  # dt_bias
        -torch.rand(nheads) * 4 - 0.5,  # A
        rand(nheads if D_per_head else d_inner),
        rand(batch, nheads, headdim, d_state),  # ssm_state
        *dt_limit,
        1 + rand(d_inner) if gate_norm else None,
        1e-5,
        d_inner // ngroups,
        norm_before_gate,
        rand(d_model, d_inner, scale=d_inner**-0.5),
        rand(d_model) if biases else None,
    )


def mlp_params(d_model, hidden, *, rms_norm=True, biases=False):
    return norm_params(d_model, rms_norm) + (
        rand(2 * hidden, d_model, scale=d_model**-0.5),
        rand(2 * hidden) if biases else None,
        rand(d_model, hidden, scale=hidden**-0.5),
        rand(d_model) if biases else None,
    )


def clone(params):
    return tuple(p.clone() if isinstance(p, torch.Tensor) else p for p in params)


def check_kernel_against_reference(op, ref, batch, d_model, params, *, residual=True, context=None, updated=8):
    """Runs both on copies of the same inputs; compares outputs, new residuals and every tensor of params
    (the states, updated in place; the others are unchanged). ``context``: an attention step's
    (past, positions, key_mask); ``updated``: the index in params of a state the step must change."""
    hidden, res = rand(batch, d_model, scale=1.0), rand(batch, d_model, scale=1.0) if residual else None
    ours, theirs = clone(params), clone(params)
    if context is not None:
        ours, theirs = with_context(ours, *context), with_context(theirs, *context)
    with torch.no_grad():
        out, new_residual = op(hidden, res, *ours, backend="cpu")
        expected_out, expected_residual = ref(hidden, res, *theirs)
    assert_close(out, expected_out, msg="out")
    assert_close(new_residual, expected_residual, msg="new residual")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if isinstance(a, torch.Tensor) and not a.is_floating_point():  # an int8 weight, positions: unchanged
            assert torch.equal(a, b), f"params[{i}]"
        elif isinstance(a, torch.Tensor):
            assert_close(a, b, msg=f"params[{i}]")
    if updated is not None:
        assert not torch.equal(ours[updated], params[updated]), f"params[{updated}], a state, was not updated"


# batch 17 takes the BLAS (decode_linear's kernel serves 1-16 rows); d_model 256 and d_inner 512
# take decode_linear's kernel for every projection but dt_proj and x_proj's (inner < 256).
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("d_model, d_inner", [(64, 128), (256, 512)])
def test_mamba_matches_reference(batch, d_model, d_inner):
    params = mamba_params(batch, d_model, d_inner)
    check_kernel_against_reference(mamba_block_step, mamba_block_step_ref, batch, d_model, params)


@pytest.mark.parametrize("rms_norm", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("biases", [True, False])
def test_mamba_norms_first_block_and_biases(rms_norm, residual, biases):
    params = mamba_params(2, 64, 128, rms_norm=rms_norm, biases=biases, d_state=5, dt_rank=3, width=3)
    check_kernel_against_reference(mamba_block_step, mamba_block_step_ref, 2, 64, params, residual=residual)


# Where each op's projection weights are among its params (mamba_params, mamba2_params, mlp_params,
# attention_params), in the order of their scales: Mamba-1's in_proj, x_proj, dt_proj and out_proj.
PROJECTIONS = {
    "mamba_block_step": (4, 9, 10, 15),
    "mamba2_block_step": (4, 19),
    "mlp_block_step": (4, 6),
    "attention_block_step": (4, 14),
}


def quantized_params(op, params, mode):
    """``params`` with ``op``'s projections quantised (weight-only, ``mode``), their scales appended."""
    params, scales = list(params), []
    for i in PROJECTIONS[op]:
        params[i], scale = quantize_weight(params[i], mode)
        scales.append(scale)
    return tuple(params) + tuple(scales)


def quantized_mamba_params(params, mode):
    return quantized_params("mamba_block_step", params, mode)


# batch 17 takes the dequantised weight and the BLAS; d_model 256 the kernel's main loops.
@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("batch, d_model", [(1, 64), (3, 256), (17, 64)])
def test_mamba_quantized_projections_match_reference(mode, batch, d_model):
    params = quantized_mamba_params(mamba_params(batch, d_model, 2 * d_model, biases=True), mode)
    check_kernel_against_reference(mamba_block_step, mamba_block_step_ref, batch, d_model, params)


@pytest.mark.parametrize("index, value, match", [
    (-4, None, "in_proj_scale must be a float32 \\(256,\\) tensor for an int8 in_proj_weight, got None"),
    (-3, torch.ones(3), "x_proj_scale must be a float32 \\(40,\\) tensor"),
    (-1, torch.ones(64), "out_proj_scale must be None for a torch.float32 out_proj_weight"),
])
def test_mamba_quantized_projections_are_checked(index, value, match):
    params = list(quantized_mamba_params(mamba_params(2, 64, 128), "int8"))
    if index == -1:
        params[15] = rand(64, 128)  # a float32 out_proj with a scale
    params[index] = value
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        mamba_block_step(rand(2, 64), None, *params, backend="cpu")


QUANTIZED_KERNELS = {
    "mamba2_block_step": (mamba2_block_step, mamba2_block_step_ref),
    "mlp_block_step": (mlp_block_step, mlp_block_step_ref),
    "attention_block_step": (attention_block_step, attention_block_step_ref),
}


# Mamba-2's, the MLP's and attention's projections quantised; batch 17 takes the dequantised
# weight and the BLAS, d_model 256 the kernel's main loops.
@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("batch, d_model", [(1, 64), (3, 256), (17, 64)])
@pytest.mark.parametrize("op", ["mamba2_block_step", "mlp_block_step", "attention_block_step"])
def test_quantized_blocks_match_reference(op, mode, batch, d_model):
    if op == "mamba2_block_step":
        params = mamba2_params(batch, d_model, biases=True)
    elif op == "mlp_block_step":
        params = mlp_params(d_model, 3 * d_model // 2, biases=True)
    else:
        params = attention_params(batch, d_model)
    kernel, ref = QUANTIZED_KERNELS[op]
    check_kernel_against_reference(
        kernel, ref, batch, d_model, quantized_params(op, params, mode),
        context=(7, torch.arange(batch) + 3, None) if op == "attention_block_step" else None,
        updated={"mamba2_block_step": 8, "mlp_block_step": None, "attention_block_step": 6}[op],  # conv state, k_cache
    )


@pytest.mark.parametrize("op, index, match", [
    ("mamba2_block_step", -2, "in_proj_scale must be a float32 \\(\\d+,\\) tensor for an int8 in_proj_weight, got None"),
    ("mlp_block_step", -1, "fc2_scale must be a float32 \\(64,\\) tensor for an int8 fc2_weight, got None"),
    ("attention_block_step", -1, "out_proj_scale must be a float32 \\(64,\\) tensor for an int8 out_proj_weight"),
])
def test_quantized_block_scales_are_checked(op, index, match):
    params = {"mamba2_block_step": lambda: mamba2_params(2, 64), "mlp_block_step": lambda: mlp_params(64, 96),
              "attention_block_step": lambda: attention_params(2, 64)}[op]()
    params = list(quantized_params(op, params, "int8"))
    params[index] = None
    kernel = QUANTIZED_KERNELS[op][0]
    if op == "attention_block_step":
        params = list(with_context(tuple(params), 3, None, None))
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        kernel(rand(2, 64), rand(2, 64), *params, backend="cpu")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("D_per_head", [True, False])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.01, 0.05)], ids=["no-limit", "limit"])
def test_mamba2_matches_reference(batch, ngroups, D_per_head, dt_limit):
    params = mamba2_params(batch, 64, ngroups=ngroups, D_per_head=D_per_head, dt_limit=dt_limit)
    check_kernel_against_reference(mamba2_block_step, mamba2_block_step_ref, batch, 64, params)


@pytest.mark.parametrize("gate_norm, norm_before_gate", [(True, True), (False, False)])
@pytest.mark.parametrize("rms_norm, biases", [(False, True), (True, False)])
def test_mamba2_gates_and_norms(gate_norm, norm_before_gate, rms_norm, biases):
    params = mamba2_params(2, 256, nheads=4, headdim=64, ngroups=2, gate_norm=gate_norm,
                           norm_before_gate=norm_before_gate, rms_norm=rms_norm, biases=biases)
    check_kernel_against_reference(mamba2_block_step, mamba2_block_step_ref, 2, 256, params)


@pytest.mark.parametrize("batch", [1, 17])
@pytest.mark.parametrize("d_model, hidden, rms_norm, biases", [(64, 96, True, False), (256, 384, False, True)])
def test_mlp_matches_reference(batch, d_model, hidden, rms_norm, biases):
    params = mlp_params(d_model, hidden, rms_norm=rms_norm, biases=biases)
    hidden_states, residual = rand(batch, d_model, scale=1.0), rand(batch, d_model, scale=1.0)
    with torch.no_grad():
        out, new_residual = mlp_block_step(hidden_states, residual, *params, backend="cpu")
        expected = mlp_block_step_ref(hidden_states, residual, *params)
    assert_close(out, expected[0], msg="out")
    assert_close(new_residual, expected[1], msg="new residual")


def test_prepared_step_equals_the_function_and_checks_its_inputs():
    params = mamba_params(2, 64, 128)
    hidden, residual = rand(2, 64), rand(2, 64)
    twin = clone(params)
    step = prepare_block_step("mamba_block_step", params, backend="cpu")
    with torch.no_grad():
        for _ in range(3):
            got = step(hidden, residual)
            expected = mamba_block_step(hidden, residual, *twin, backend="cpu")
            assert all(torch.equal(a, b) for a, b in zip(got, expected))
        with pytest.raises(ValueError, match=r"hidden_states must be float32 of shape \(2, d_model=64\)"):
            step(rand(3, 64), residual)
        with pytest.raises(ValueError, match="residual must be float32"):
            step(hidden, residual.double())
    mlp = prepare_block_step("mlp_block_step", mlp_params(64, 96), backend="cpu")
    with torch.no_grad(), pytest.raises(TypeError, match="residual must be a tensor"):
        mlp(hidden, None)
    with pytest.raises(ValueError, match="op must be one of"):
        prepare_block_step("conv_block_step", params)
    with pytest.raises(ValueError, match="an attention step takes per-step arguments"):
        prepare_block_step("attention_block_step", params)


def test_inference_only():
    params = tuple(p.requires_grad_() if isinstance(p, torch.Tensor) and p.ndim == 2 else p
                   for p in mlp_params(64, 96))
    with pytest.raises(RuntimeError, match="no backward"):
        mlp_block_step(rand(1, 64), rand(1, 64), *params, backend="cpu")
    assert "torch.no_grad()" in NO_BACKWARD
    with torch.no_grad():  # the same call, without grad, runs
        mlp_block_step(rand(1, 64), rand(1, 64), *params, backend="cpu")


@pytest.mark.parametrize("index, value, error, match", [
    (4, rand(200, 64), ValueError, r"in_proj_weight must have 2 \* d_inner = 256 outputs, got 200"),
    (9, rand(30, 128), ValueError, r"x_proj_weight must have dt_rank \+ 2 \* d_state = 40 outputs, got 30"),
    (15, rand(64, 100), ValueError, r"out_proj_weight has shape \(64, 100\)"),
    (11, rand(128).double(), TypeError, "dt_proj_bias must be float32"),
    (2, 0.0, ValueError, "norm_eps must be a number > 0"),
    (3, 1, TypeError, "rms_norm must be a bool"),
    (8, rand(2, 128, 2), ValueError, r"conv_state must hold at least width - 1 = 3 inputs"),
])
def test_bad_arguments_are_named(index, value, error, match):
    params = list(mamba_params(2, 64, 128))
    params[index] = value
    with torch.no_grad(), pytest.raises(error, match=match):
        mamba_block_step(rand(2, 64), None, *params, backend="cpu")


@pytest.mark.parametrize("changes, match", [
    ({13: 0.5, 14: 0.1}, "dt_min and dt_max must satisfy"),
    ({17: 24}, "gate_norm_group_size must divide d_inner = 128"),
    ({4: rand(300, 64)}, r"in_proj_weight must have d_inner \+ conv_dim \+ nheads"),
])
def test_mamba2_bad_arguments_are_named(changes, match):
    params = list(mamba2_params(2, 64))
    for index, value in changes.items():
        params[index] = value
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        mamba2_block_step(rand(2, 64), None, *params, backend="cpu")


def test_kernel_checks_its_arguments():
    params = list(mamba_params(2, 64, 128))
    params[4] = rand(200, 64)  # in_proj_weight with the wrong number of outputs, past the Python checks
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"mamba_block_step \(cpu\): in_proj must have 2 \* d_inner"):
        mamba_block_step_cpu(rand(2, 64), None, *params)
    params = list(mamba_params(2, 64, 128))
    with torch.no_grad(), pytest.raises(RuntimeError, match="hidden_states must be a float32 CPU tensor"):
        mamba_block_step_cpu(rand(2, 64).double(), None, *params)


def test_compiles_with_fullgraph():
    params = mamba_params(2, 64, 128)
    twin = clone(params)
    hidden, residual = rand(2, 64), rand(2, 64)

    def step(hidden, residual, *params):
        return mamba_block_step(hidden, residual, *params, backend="cpu")

    with torch.no_grad():
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(hidden, residual, *params)
        expected = step(hidden, residual, *twin)
    for a, b in zip(got + params, expected + twin):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def attention_params(batch, d_model, *, num_heads=4, heads_kv=2, head_dim=16, max_seqlen=12, rotary_dim=8,
                     interleaved=False, sliding_window=0, rms_norm=True, biases=True):
    qkv = (num_heads + 2 * heads_kv) * head_dim
    return norm_params(d_model, rms_norm) + (
        rand(qkv, d_model, scale=d_model**-0.5),
        rand(qkv) if biases else None,
        rand(batch, max_seqlen, heads_kv, head_dim, scale=1.0),  # k_cache: past slots hold earlier keys
        rand(batch, max_seqlen, heads_kv, head_dim, scale=1.0),
        num_heads,
        head_dim**-0.5,
        sliding_window,
        rotary_dim,
        10000.0,
        interleaved,
        rand(d_model, num_heads * head_dim, scale=(num_heads * head_dim) ** -0.5),
        rand(d_model) if biases else None,
    )


def with_context(params, past, positions, key_mask):
    return params[:8] + (past, positions, key_mask) + params[8:]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("past", [0, 7])
@pytest.mark.parametrize("heads_kv, rotary_dim, interleaved", [(4, 16, False), (2, 8, True), (1, 0, False)])
@pytest.mark.parametrize("sliding_window", [0, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_reference(batch, past, heads_kv, rotary_dim, interleaved, sliding_window, masked):
    params = attention_params(batch, 64, heads_kv=heads_kv, rotary_dim=rotary_dim, interleaved=interleaved,
                              sliding_window=sliding_window)
    positions = torch.randint(0, 1000, (batch,))
    key_mask = torch.rand(batch, past + 1) < 0.6 if masked else None
    hidden, residual = rand(batch, 64, scale=1.0), rand(batch, 64, scale=1.0)
    ours, theirs = clone(params), clone(params)
    with torch.no_grad():
        got = attention_block_step(hidden, residual, *with_context(ours, past, positions, key_mask), backend="cpu")
        expected = attention_block_step_ref(hidden, residual, *with_context(theirs, past, positions, key_mask))
    assert_close(got[0], expected[0], msg="out")
    assert_close(got[1], expected[1], msg="new residual")
    for cache in (6, 7):  # the new keys and values went to slot past, and nowhere else
        assert_close(ours[cache], theirs[cache], msg=f"params[{cache}]")
        assert torch.equal(ours[cache][:, past + 1 :], params[cache][:, past + 1 :])


def test_attention_masks_what_it_must():
    # A masked key, or one out of the window, changes nothing: replace it by noise and compare.
    params = attention_params(2, 64, sliding_window=4)
    positions, past = torch.tensor([5, 9]), 9
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[0, 7] = False
    noisy = clone(params)
    noisy[6][0, 7] += 5.0  # masked for row 0
    noisy[6][:, 2] += 5.0  # outside the window (slots 6-9) for both rows
    hidden = rand(2, 64, scale=1.0)
    with torch.no_grad():
        a = attention_block_step(hidden, None, *with_context(clone(params), past, positions, key_mask), backend="cpu")
        b = attention_block_step(hidden, None, *with_context(noisy, past, positions, key_mask), backend="cpu")
        c = attention_block_step(hidden, None, *with_context(clone(params), past, positions, None), backend="cpu")
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[0][0], c[0][0]) and torch.equal(a[0][1], c[0][1])  # row 0 saw the masked key


@pytest.mark.parametrize("changes, context, error, match", [
    ({8: 3}, (2, None, None), ValueError, r"num_heads \(3\) must be a multiple of the caches' num_heads_kv \(2\)"),
    ({11: 5}, (2, None, None), ValueError, r"rotary_dim must be even"),
    ({}, (12, None, None), ValueError, r"past must be an int in \[0, max_seqlen=12\)"),
    ({}, (2, None, torch.ones(2, 4, dtype=torch.bool)), ValueError, r"key_mask has shape \(2, 4\)"),
    ({}, (2, torch.zeros(3, dtype=torch.long), None), ValueError, r"positions has shape \(3,\)"),
])
def test_attention_bad_arguments_are_named(changes, context, error, match):
    params = list(attention_params(2, 64))
    for index, value in changes.items():
        params[index] = value
    with torch.no_grad(), pytest.raises(error, match=match):
        attention_block_step(rand(2, 64), None, *with_context(tuple(params), *context), backend="cpu")


def stack(batch, d_model=64, padded_vocab=40):
    """An embedding, a Mamba-1 block, a Mamba-2 block with its MLP, an attention block, and a final LayerNorm."""
    blocks = [
        ("mamba_block_step", mamba_params(batch, d_model, 128)),
        ("mamba2_block_step", mamba2_params(batch, d_model)),
        ("mlp_block_step", mlp_params(d_model, 96)),
        ("attention_block_step", attention_params(batch, d_model)),
    ]
    return rand(padded_vocab, d_model, scale=1.0), blocks, norm_params(d_model, rms_norm=False)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_matches_reference(batch):
    embedding, blocks, final_norm = stack(batch)
    twin = [(op, clone(params)) for op, params in blocks]
    step = prepare_decode_step(embedding, 37, blocks, final_norm, backend="cpu")

    def reference(ids, past, positions, key_mask):
        return decode_step_ref(ids, embedding, 37, twin, final_norm, past, positions, key_mask)

    with torch.no_grad():
        for t in range(3):
            ids = torch.randint(0, 37, (batch,))
            past = 4 + t
            key_mask = torch.rand(batch, past + 1) < 0.7 if t else None
            positions = key_mask.sum(1) - 1 if t else None
            assert_close(step(ids, past, positions, key_mask), reference(ids, past, positions, key_mask),
                         msg=f"step {t}")
            for (_, ours), (_, theirs) in zip(blocks, twin):
                for a, b in zip(ours, theirs):
                    if isinstance(a, torch.Tensor):
                        assert_close(a, b, msg=f"states after step {t}")


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantized_decode_step_matches_reference(mode):
    embedding, blocks, final_norm = stack(2)
    blocks = [(op, quantized_params(op, params, mode)) for op, params in blocks]
    embedding, embedding_scale = quantize_weight(embedding, mode)
    twin = [(op, clone(params)) for op, params in blocks]
    step = prepare_decode_step(embedding, 37, blocks, final_norm, embedding_scale=embedding_scale, backend="cpu")
    with torch.no_grad():
        for t in range(3):
            ids = torch.randint(0, 37, (2,))
            expected = decode_step_ref(ids, embedding, 37, twin, final_norm, 4 + t, embedding_scale=embedding_scale)
            assert_close(step(ids, 4 + t), expected, msg=f"step {t}")
    with pytest.raises(ValueError, match="embedding_scale must be a float32 \\(40,\\) tensor for an int8 embedding, got None"):
        prepare_decode_step(embedding if mode == "int8" else embedding.to(torch.int8), 37, blocks, final_norm)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_timed_decode_step_gives_the_seconds_of_each_part(backend):
    embedding, blocks, final_norm = stack(2)
    twin = [(op, clone(params)) for op, params in blocks]
    timed = prepare_decode_step(embedding, 37, blocks, final_norm, backend=backend, timed=True)
    plain = prepare_decode_step(embedding, 37, twin, final_norm, backend=backend)
    ids = torch.tensor([3, 36])
    with torch.no_grad():
        out, seconds = timed(ids, 5)
        assert torch.equal(out, plain(ids, 5))
    assert seconds.dtype == torch.float64 and seconds.shape == (2 + len(blocks),)
    assert (seconds >= 0).all() and (seconds[1:-1] > 0).all()


def test_decode_step_checks():
    embedding, blocks, final_norm = stack(2)
    with pytest.raises(ValueError, match="must not start with an MLP block"):
        prepare_decode_step(embedding, 37, blocks[2:], final_norm)
    with pytest.raises(ValueError, match=r"blocks\[1\] \(mamba2_block_step\) has batch = 3, the blocks before it 2"):
        prepare_decode_step(embedding, 37, [blocks[0], ("mamba2_block_step", mamba2_params(3, 64))], final_norm)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, padded_vocab_size=40\]"):
        prepare_decode_step(embedding, 41, blocks, final_norm)
    with pytest.raises(ValueError, match="op must be one of"):
        prepare_decode_step(embedding, 37, [("conv_block_step", ())], final_norm)
    step = prepare_decode_step(embedding, 37, blocks, final_norm, backend="cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, vocab_size=37\); got the id 37"):
        step(torch.tensor([0, 37]), 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"ssm_state must have shape \[3, 128, 16\]"):
        step(torch.tensor([0, 1, 2]), 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"past must be in \[0, max_seqlen = 12\)"):
        step(torch.tensor([0, 1]), 12)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"key_mask must be bool of shape \(2, past \+ 1 = 4\)"):
        step(torch.tensor([0, 1]), 3, None, torch.ones(2, 3, dtype=torch.bool))


def test_mamba_states_must_be_contiguous():
    params = list(mamba_params(2, 64, 128))
    params[14] = rand(2, 16, 128).transpose(1, 2)  # ssm_state (batch, d_inner, d_state), strided
    with torch.no_grad(), pytest.raises(ValueError, match="ssm_state must be contiguous"):
        mamba_block_step(rand(2, 64), None, *params, backend="cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match="ssm_state must be contiguous"):
        mamba_block_step_cpu(rand(2, 64), None, *params)
