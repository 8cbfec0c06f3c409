"""lnlm_ssm.compat.install_as_mamba_ssm: code written for mamba_ssm / causal_conv1d runs unmodified.

Each case runs in a fresh interpreter, since installing changes sys.modules for good.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lnlm_ssm.ops as ops
from lnlm_ssm.compat import MODULES

REPO = Path(__file__).resolve().parents[2]
INSTALL = "import lnlm_ssm.compat\nlnlm_ssm.compat.install_as_mamba_ssm()\n"


def run(code: str, *, install: bool = True, extra_path: str = "") -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, after install_as_mamba_ssm() unless ``install`` is False."""
    source = (INSTALL if install else "") + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(REPO)) if p))
    return subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300)


def test_every_served_name_is_an_op():
    for module, names in MODULES.items():
        for incumbent_name, ours in names.items():
            assert hasattr(ops, ours), f"{module}.{incumbent_name} maps to lnlm_ssm.ops.{ours}, which does not exist"


# Written against the incumbents' import paths, as a Mamba-2 layer's prefill and decode would be.
INCUMBENT_SNIPPET = """
import torch
import torch.nn.functional as F
from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mamba_ssm.ops.triton.selective_state_update import selective_state_update
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

torch.manual_seed(0)
batch, seqlen, nheads, headdim, dstate, width = 2, 9, 4, 3, 5, 4
dim = nheads * headdim
xBC = torch.randn(batch, dim + 2 * dstate, seqlen)
conv_w, conv_b = torch.randn(dim + 2 * dstate, width), torch.randn(dim + 2 * dstate)
dt, dt_bias, A, D = torch.randn(batch, seqlen, nheads), torch.randn(nheads), -torch.rand(nheads), torch.randn(nheads)
norm_w, z = torch.randn(dim), torch.randn(batch, seqlen, dim)

# Prefill of the first seqlen - 1 steps, keeping the conv and SSM states.
out = causal_conv1d_fn(xBC[..., :-1], conv_w, conv_b, activation="silu")
conv_state = F.pad(xBC[..., :-1], (width - 1 - (seqlen - 1), 0))
x, B, C = torch.split(out.transpose(1, 2), [dim, dstate, dstate], dim=-1)
y, ssm_state = mamba_chunk_scan_combined(
    x.reshape(batch, seqlen - 1, nheads, headdim), dt[:, :-1], A, B[:, :, None], C[:, :, None], 4,
    D=D, dt_bias=dt_bias, dt_softplus=True, return_final_states=True)
y = rmsnorm_fn(y.reshape(batch, seqlen - 1, dim), norm_w, None, z=z[:, :-1], norm_before_gate=False)

# One decode step, then the whole sequence at once: the last step must agree.
conv_out = causal_conv1d_update(xBC[..., -1], conv_state, conv_w, conv_b, "silu")
x1, B1, C1 = torch.split(conv_out, [dim, dstate, dstate], dim=-1)
y1 = selective_state_update(
    ssm_state, x1.reshape(batch, nheads, headdim), dt[:, -1, :, None].expand(-1, -1, headdim),
    A[:, None, None].expand(-1, headdim, dstate), B1[:, None], C1[:, None], D[:, None].expand(-1, headdim),
    dt_bias=dt_bias[:, None].expand(-1, headdim), dt_softplus=True)
full = causal_conv1d_fn(xBC, conv_w, conv_b, activation="silu")
xf, Bf, Cf = torch.split(full.transpose(1, 2), [dim, dstate, dstate], dim=-1)
yf = mamba_chunk_scan_combined(
    xf.reshape(batch, seqlen, nheads, headdim), dt, A, Bf[:, :, None], Cf[:, :, None], 4,
    D=D, dt_bias=dt_bias, dt_softplus=True)
torch.testing.assert_close(y1, yf[:, -1], rtol=1e-4, atol=1e-4)
torch.testing.assert_close(y, rmsnorm_fn(yf[:, :-1].reshape(batch, seqlen - 1, dim), norm_w, None, z=z[:, :-1], norm_before_gate=False), rtol=1e-4, atol=1e-4)

# Mamba-1's scan, by position.
u, delta = torch.randn(batch, dim, seqlen), torch.rand(batch, dim, seqlen)
out, last = selective_scan_fn(u, delta, -torch.rand(dim, dstate), torch.randn(batch, dstate, seqlen), torch.randn(batch, dstate, seqlen), None, None, None, True, True)
assert out.shape == (batch, dim, seqlen) and last.shape == (batch, dim, dstate)
print("snippet ok")
"""


def test_incumbent_snippet_runs_unmodified():
    result = run(INCUMBENT_SNIPPET)
    assert result.returncode == 0, result.stderr
    assert "snippet ok" in result.stdout


def test_without_install_the_incumbent_imports_fail():
    """The snippet cannot pass by accident: without the install, mamba_ssm does not exist here."""
    result = run(INCUMBENT_SNIPPET, install=False)
    assert result.returncode != 0 and "No module named 'causal_conv1d'" in result.stderr


def test_served_modules_hold_our_functions():
    result = run("""
        import mamba_ssm, causal_conv1d, lnlm_ssm.ops as ops, lnlm_ssm.compat as compat
        from mamba_ssm.ops.triton.layer_norm import rms_norm_ref
        from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref as gated_ref
        from causal_conv1d.causal_conv1d_varlen import causal_conv1d_varlen_states
        assert mamba_ssm.selective_scan_fn is ops.selective_scan_fn
        assert rms_norm_ref is ops.rms_norm_ref and gated_ref is ops.rms_norm_gated_ref
        assert causal_conv1d_varlen_states is ops.causal_conv1d_varlen_states
        compat.install_as_mamba_ssm()  # again: a no-op
        assert compat.installed()
        try:
            mamba_ssm.Mamba
        except AttributeError as exc:
            assert "lnlm_ssm.layers" in str(exc), exc
        else:
            raise AssertionError("mamba_ssm.Mamba must not exist")
        print("modules ok")
    """)
    assert result.returncode == 0, result.stderr
    assert "modules ok" in result.stdout


@pytest.mark.parametrize("package", ["mamba_ssm", "causal_conv1d"])
def test_refuses_when_the_real_package_is_importable(tmp_path, package):
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    result = run("", extra_path=str(tmp_path))
    assert result.returncode != 0
    assert f"RealPackageError: {package} is installed" in result.stderr
    assert "would shadow it" in result.stderr


def test_hf_transformers_mamba_runs_on_our_ops(tmp_path):
    """transformers resolves mamba_ssm's functions when its Mamba model is imported: after the
    install they are ours, and the model's logits stay those of its own PyTorch path."""
    from transformers import MambaConfig, MambaForCausalLM
    import torch

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)).eval()
    model.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "io.pt")
    result = run(f"""
        import functools, torch, lnlm_ssm.compat, lnlm_ssm.ops as ops
        calls = []
        def counted(name, fn):
            @functools.wraps(fn)  # transformers passes only the keywords that fn's signature names
            def wrapper(*args, **kwargs):
                calls.append(name)
                return fn(*args, **kwargs)
            return wrapper
        for name in ("mamba_inner_fn", "selective_scan_fn", "causal_conv1d_fn"):
            setattr(ops, name, counted(name, getattr(ops, name)))
        lnlm_ssm.compat.install_as_mamba_ssm()
        # transformers >= 5.25 sends only CUDA inputs to mamba_ssm / causal_conv1d (their own kernels are CUDA
        # only); ours run on the CPU too, so declare it before the model module resolves the functions.
        from transformers.integrations import hub_kernels
        for package in ("mamba_ssm", "causal_conv1d"):
            devices = getattr(hub_kernels, "_PACKAGE_SUPPORTED_DEVICES", {{}})
            if package in devices:
                devices[package] = (*devices[package], "cpu")
        from transformers import MambaForCausalLM
        io = torch.load({str(tmp_path / 'io.pt')!r})
        model = MambaForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}).eval()
        with torch.no_grad():
            logits = model(io["ids"]).logits
        torch.testing.assert_close(logits, io["logits"], rtol=1e-4, atol=1e-4)
        assert calls, "transformers did not call lnlm_ssm's ops"
        # On a GPU, is_mamba_ssm_available() is this and torch.cuda.is_available(): the fast path.
        from transformers.utils.import_utils import _is_package_available
        assert _is_package_available("mamba_ssm")[0] and _is_package_available("causal_conv1d")[0]
        print("hf ok", sorted(set(calls)))
    """, install=False)
    assert result.returncode == 0, result.stderr
    assert "hf ok" in result.stdout
