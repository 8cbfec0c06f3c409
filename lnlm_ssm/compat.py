"""Zero-change migration from mamba_ssm and causal-conv1d, as PyMySQL's ``install_as_MySQLdb()``.

For code that cannot be edited (a library, a vendored script)::

    import lnlm_ssm.compat
    lnlm_ssm.compat.install_as_mamba_ssm()

    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn   # lnlm_ssm's op
    from causal_conv1d import causal_conv1d_fn                              # lnlm_ssm's op

:func:`install_as_mamba_ssm` puts modules named as the incumbents' into
``sys.modules``, each holding our functions under the incumbent's names
(:data:`MODULES`). It only serves the ops: the incumbents' nn.Modules and
models (``mamba_ssm.Mamba``, ``MambaLMHeadModel``, ...) are not provided,
and asking for one says where ours are.

It is explicit opt-in, and it refuses when the real packages are importable,
so that it never hides an installed mamba_ssm or causal_conv1d.

Hugging Face transformers looks these packages up by import: after
:func:`install_as_mamba_ssm`, its Mamba and Mamba-2 models imported
afterwards run their kernel path on our ops (transformers 5 resolves them
when ``modeling_mamba`` is imported, on CPU too), and on a GPU
``is_mamba_ssm_available()`` / ``is_causal_conv1d_available()`` report True,
so their CUDA fast path runs on our kernels.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import lnlm_ssm.ops as ops

# Incumbent module -> {incumbent name: name in lnlm_ssm.ops}.
MODULES: dict[str, dict[str, str]] = {
    "mamba_ssm": {"selective_scan_fn": "selective_scan_fn", "mamba_inner_fn": "mamba_inner_fn"},
    "mamba_ssm.ops": {},
    "mamba_ssm.ops.selective_scan_interface": {
        "selective_scan_fn": "selective_scan_fn",
        "selective_scan_ref": "selective_scan_ref",
        "mamba_inner_fn": "mamba_inner_fn",
        "mamba_inner_ref": "mamba_inner_ref",
    },
    "mamba_ssm.ops.triton": {},
    "mamba_ssm.ops.triton.selective_state_update": {
        "selective_state_update": "selective_state_update",
        "selective_state_update_ref": "selective_state_update_ref",
    },
    "mamba_ssm.ops.triton.ssd_combined": {
        "mamba_chunk_scan_combined": "mamba_chunk_scan_combined",
        "mamba_split_conv1d_scan_combined": "mamba_split_conv1d_scan_combined",
        "mamba_split_conv1d_scan_ref": "mamba_split_conv1d_scan_ref",
    },
    "mamba_ssm.ops.triton.layer_norm": {
        "layer_norm_fn": "layer_norm_fn",
        "rms_norm_fn": "rms_norm_fn",
        "layer_norm_ref": "layer_norm_ref",
        "rms_norm_ref": "rms_norm_ref",
    },
    # Same name as layer_norm's reference, another signature: the gated norm's reference.
    "mamba_ssm.ops.triton.layernorm_gated": {
        "rmsnorm_fn": "rmsnorm_fn",
        "layernorm_fn": "layernorm_fn",
        "rms_norm_ref": "rms_norm_gated_ref",
    },
    "causal_conv1d": {"causal_conv1d_fn": "causal_conv1d_fn", "causal_conv1d_update": "causal_conv1d_update"},
    "causal_conv1d.causal_conv1d_interface": {
        "causal_conv1d_fn": "causal_conv1d_fn",
        "causal_conv1d_ref": "causal_conv1d_ref",
        "causal_conv1d_update": "causal_conv1d_update",
        "causal_conv1d_update_ref": "causal_conv1d_update_ref",
    },
    "causal_conv1d.causal_conv1d_varlen": {
        "causal_conv1d_varlen_states": "causal_conv1d_varlen_states",
        "causal_conv1d_varlen_states_ref": "causal_conv1d_varlen_states_ref",
    },
}
PACKAGES = ("mamba_ssm", "causal_conv1d")
_MARK = "__lnlm_ssm_compat__"


class RealPackageError(ImportError):
    """The real mamba_ssm or causal_conv1d is importable: install_as_mamba_ssm would shadow it."""


def _missing(module_name: str, served: tuple[str, ...]):
    def __getattr__(name: str):
        raise AttributeError(
            f"module {module_name!r} (lnlm_ssm.compat) has no attribute {name!r}: it serves only "
            f"{', '.join(served) or 'its submodules'}; lnlm_ssm's layers and models are in "
            "lnlm_ssm.layers and lnlm_ssm.models"
        )

    return __getattr__


def _module(name: str, names: dict[str, str]) -> types.ModuleType:
    module = types.ModuleType(name, f"lnlm_ssm's ops under {name}'s names (lnlm_ssm.compat).")
    is_package = any(other.startswith(name + ".") for other in MODULES)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=is_package)
    if is_package:
        module.__path__ = []
    for incumbent_name, ours in names.items():
        setattr(module, incumbent_name, getattr(ops, ours))
    module.__all__ = list(names)
    module.__getattr__ = _missing(name, tuple(names))
    setattr(module, _MARK, True)
    return module


def installed() -> bool:
    """True when install_as_mamba_ssm() has run in this process."""
    return all(getattr(sys.modules.get(p), _MARK, False) for p in PACKAGES)


def install_as_mamba_ssm() -> None:
    """Make ``import mamba_ssm...`` and ``import causal_conv1d...`` resolve to lnlm_ssm's ops.

    Raises :class:`RealPackageError` when either real package is importable
    (or already imported). Calling it again is a no-op.
    """
    if installed():
        return
    for package in PACKAGES:
        found = sys.modules.get(package) or importlib.util.find_spec(package)
        if found is not None:
            where = getattr(found, "origin", None) or getattr(found, "__file__", None) or "sys.modules"
            raise RealPackageError(
                f"{package} is installed ({where}); install_as_mamba_ssm() would shadow it. "
                f"Import lnlm_ssm.ops directly, or uninstall {package} first"
            )
    for name, names in MODULES.items():
        module = _module(name, names)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
