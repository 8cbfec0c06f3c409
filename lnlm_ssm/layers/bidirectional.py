"""Bidirectional SSM mixers for encoders: ``BiMamba`` (Caduceus-style) and ``Hydra`` (quasiseparable).

Both see the whole sequence at once: the output at position t depends on the
tokens before and after t. Neither has an incremental decode, so neither takes
a cache (see the mixer contract in ``layers.base``).

Padding: encoder batches are right-padded (``mask`` True for real tokens, the
real tokens first). A pad position reaches no state in either direction, so the
real positions of a padded row equal that row run alone, to rounding. The
outputs at pad positions are unspecified (finite, but not zero): pool or score
only the real ones. Left padding works as well; pads between real tokens do not
(the convs, and Hydra's shift, would read them).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lnlm_ssm.layers.base import Mixer
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2, _GatedRMSNorm
from lnlm_ssm.layers.ssm import check_hidden_states, chunk_mask, conv_weight, inverse_softplus_dt
from lnlm_ssm.ops import causal_conv1d_fn, mamba_chunk_scan_combined
from lnlm_ssm.ops._backends import backend_for, check_backend
from lnlm_ssm.utils.checks import NO_DT_LIMIT, check_choice, check_dt_limit, check_positive_int
from lnlm_ssm.utils.dtypes import to_math_dtype

INNER_MIXERS = {"Mamba1": Mamba, "Mamba2": Mamba2}
COMBINES = ("add", "mean")


class BidirectionalMixer(Mixer):
    """What the bidirectional mixers share: no cache, and the checks of a full-sequence call."""

    d_model: int

    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None):
        """Always raises: a bidirectional mixer has no incremental decode, so no inference state."""
        raise NotImplementedError(
            f"{type(self).__name__} is a bidirectional mixer: it has no incremental decode and so no cache"
        )

    def _check(self, hidden_states, cache, mask) -> Optional[torch.Tensor]:
        """Validate a call; return ``mask`` as 0/1 in the hidden states' dtype, (batch, seqlen), or None."""
        if cache is not None:
            raise ValueError(
                f"cache must be None: {type(self).__name__} is bidirectional and has no incremental decode; "
                f"got {type(cache).__name__}"
            )
        check_hidden_states(hidden_states, self.d_model, None)
        batch, seqlen, _ = hidden_states.shape
        return chunk_mask(mask, batch, 0, seqlen, hidden_states.dtype)


class BiMamba(BidirectionalMixer):
    """A causal mixer run forward plus one run on the reversed sequence, outputs added (Caduceus's BiMamba).

    ``out = combine(fwd(u), flip(bwd(flip(u))))`` with ``combine`` "add" (the
    default, as Caduceus) or "mean" (their average). ``inner`` names the causal
    mixer of both directions: "Mamba1" (the default, Caduceus's choice) or
    "Mamba2"; ``inner_kwargs`` go to both (``lnlm_ssm.layers.Mamba`` or
    ``Mamba2``, parameter names as theirs, under ``fwd.`` and ``bwd.``).

    ``bidirectional_weight_tie`` shares ``in_proj`` and ``out_proj`` between the
    directions, as Caduceus does; each keeps its own conv, dt, A and D. A tied
    tensor is one parameter (listed once by ``parameters()``, one gradient) and
    is stored once in the state dict, as ``fwd.in_proj.*`` / ``fwd.out_proj.*``:
    loading fills the ``bwd.`` copies from them.

    The backward direction reads a right-padded row as a left-padded one, which
    the causal mixers already handle (their states stay zero until the first
    real token); the forward direction never sees the pads after a real token.
    """

    TIED = ("in_proj", "out_proj")

    def __init__(
        self,
        d_model: int,
        *,
        inner: str = "Mamba1",
        combine: str = "add",
        bidirectional_weight_tie: bool = False,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: str = "auto",
        **inner_kwargs,
    ):
        super().__init__()
        check_choice("inner", inner, tuple(INNER_MIXERS))
        check_choice("combine", combine, COMBINES)
        if not isinstance(bidirectional_weight_tie, bool):
            raise ValueError(f"bidirectional_weight_tie must be a bool, got {bidirectional_weight_tie!r}")
        self.d_model = d_model
        self.inner = inner
        self.combine = combine
        self.bidirectional_weight_tie = bidirectional_weight_tie
        self.layer_idx = layer_idx
        self.backend = check_backend(backend)
        make = INNER_MIXERS[inner]
        factory = {"layer_idx": layer_idx, "device": device, "dtype": dtype, "backend": backend}
        self.fwd = make(d_model, **inner_kwargs, **factory)
        self.bwd = make(d_model, **inner_kwargs, **factory)
        if bidirectional_weight_tie:
            for name in self.TIED:
                source, copy = getattr(self.fwd, name), getattr(self.bwd, name)
                for pname, param in source.named_parameters(recurse=False):
                    setattr(copy, pname, param)
            # A checkpoint holds each weight once (safetensors refuses tensors that share memory).
            self.register_state_dict_post_hook(_drop_tied_copies)
            self.register_load_state_dict_pre_hook(_fill_tied_copies)

    def extra_repr(self) -> str:
        return f"inner={self.inner}, combine={self.combine}, bidirectional_weight_tie={self.bidirectional_weight_tie}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        *,
        mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, seqlen, d_model); ``position_ids`` is unused."""
        self._check(hidden_states, cache, mask)
        forward = self.fwd(hidden_states, mask=mask)
        backward = self.bwd(hidden_states.flip(1), mask=None if mask is None else mask.flip(1)).flip(1)
        out = forward + backward
        return out / 2 if self.combine == "mean" else out


def _tied_keys(prefix: str, keys):
    """(fwd key, bwd key) of every tied tensor among ``keys`` (a state dict's, under ``prefix``)."""
    for name in BiMamba.TIED:
        source = f"{prefix}fwd.{name}."
        for key in list(keys):
            if key.startswith(source):
                yield key, f"{prefix}bwd.{name}.{key[len(source):]}"


def _drop_tied_copies(module, state_dict, prefix, local_metadata) -> None:
    for _, copy in _tied_keys(prefix, state_dict):
        state_dict.pop(copy, None)


def _fill_tied_copies(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for source, copy in _tied_keys(prefix, state_dict):
        if copy in state_dict and not torch.equal(state_dict[copy], state_dict[source]):
            error_msgs.append(f"{copy} differs from {source}, to which bidirectional_weight_tie ties it")
        state_dict[copy] = state_dict[source]


class Hydra(BidirectionalMixer):
    """Hydra (Hwang et al., 2024, arXiv 2407.09941): a quasiseparable matrix mixer built from two SSD scans.

    The paper's ``QS(X) = shift(SS(X)) + flip(shift(SS(flip(X)))) + DX``: per
    head, x is mixed by the matrix with rows ``M[t] = L_f[t - 1] + L_b[t + 1]``
    plus a diagonal, where ``L_f`` is the causal SSD matrix (s <= t) of the
    forward direction and ``L_b`` the anti-causal one (s >= t) of the backward
    direction (rows out of range are zero). The one-step shift makes the forward
    part see only s < t and the backward part only s > t; the diagonal is data
    dependent, ``x_t * (fc_D(x_t) + D)``. In steps:

    1. ``in_proj`` -> z (d_inner), xBC = [x, B_f, C_f, B_b, C_b] and dt (2 * nheads: forward, backward);
    2. xBC through a centred ("same") depthwise conv of odd width ``d_conv``, then silu;
    3. both directions in one ``mamba_chunk_scan_combined`` call: the batch is
       ``cat([x, flip(x)])`` with B, C and Δ = softplus(dt + dt_bias) of each direction (A shared);
    4. y = shift(y_f) + flip(shift(y_b)) + x * (fc_D(x) + D), shift moving every output one step later;
    5. RMSNorm of y (over all of d_inner), times silu(z); ``out_proj``.

    Arguments, parameter names (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``,
    ``D``, ``fc_D``, ``norm``, ``out_proj``) and init as the authors' module
    (goombalab/hydra): A = -1 for every head (``A_init_range=(1, 1)``), one
    dt_bias and one A per head shared by both directions. Not kept: its
    learnable initial states, ``activation`` (always silu) and the fused
    ``use_mem_eff_path``. Ours: ``A_init_range`` (as ``Mamba2``), ``norm_eps``
    (the gated norm's eps) and ``backend``.
    """

    no_weight_decay = ("A_log", "D", "dt_bias")

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 7,
        conv_init: Optional[float] = None,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 1),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = NO_DT_LIMIT,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: str = "auto",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_state", d_state),
            ("d_conv", d_conv),
            ("expand", expand),
            ("headdim", headdim),
            ("ngroups", ngroups),
            ("chunk_size", chunk_size),
        ):
            check_positive_int(name, value)
        if d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd (Hydra's conv is centred on each position); got {d_conv}")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"headdim must divide d_inner = expand * d_model = {d_inner}; got headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups must divide nheads = d_inner // headdim = {nheads}; got ngroups={ngroups}")
        low, high = A_init_range
        if not 0 < low <= high:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high; got {A_init_range!r}")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0; got {norm_eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = d_inner
        self.headdim = headdim
        self.nheads = nheads
        self.ngroups = ngroups
        self.conv_dim = d_inner + 4 * ngroups * d_state
        self.dt_limit = check_dt_limit(dt_limit)
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.backend = check_backend(backend)

        # Rows [z, x, B_f, C_f, B_b, C_b, dt_f, dt_b]; x, B and C (the conv's channels) are contiguous.
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + 2 * nheads, bias=bias, **factory)
        # The module's padding makes it the centred conv; forward runs the same conv through the causal op.
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=d_conv,
            groups=self.conv_dim,
            padding=d_conv // 2,
            bias=conv_bias,
            **factory,
        )
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(nheads, dt_min, dt_max, dt_init_floor, **factory))
        A = torch.empty(nheads, dtype=torch.float32, device=device).uniform_(low, high)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.get_default_dtype()))
        self.D = nn.Parameter(torch.ones(nheads, **factory))
        self.fc_D = nn.Linear(d_inner, nheads, bias=False, **factory)
        self.norm = _GatedRMSNorm(d_inner, norm_eps, d_inner, norm_before_gate=True, **factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        *,
        mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, seqlen, d_model); ``position_ids`` is unused."""
        keep = self._check(hidden_states, cache, mask)
        batch = hidden_states.shape[0]
        z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, 2 * self.nheads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (batch, conv_dim, seqlen), the conv's layout
        if keep is not None:
            xBC = xBC * keep[:, None, :]
        xBC = self._centred_conv(xBC).transpose(1, 2)
        group_dim = self.ngroups * self.d_state
        x, B_f, C_f, B_b, C_b = xBC.split([self.d_inner, group_dim, group_dim, group_dim, group_dim], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        dt_bias = to_math_dtype(self.dt_bias)
        # Δ here rather than in the scan, so that a pad's Δ can be 0: the pad then adds nothing to the
        # state (its input enters as Δ x B) and decays nothing, and the cumulative decays a chunked
        # kernel forms over a run of pads stay exactly zero.
        delta = F.softplus(dt.to(dt_bias.dtype).unflatten(-1, (2, self.nheads)) + dt_bias)
        if self.dt_limit != NO_DT_LIMIT:
            delta = delta.clamp(*self.dt_limit)
        if keep is not None:
            delta = delta * keep[:, :, None, None].to(delta.dtype)

        def both(forward, backward):
            return torch.cat([forward, backward.flip(1)], dim=0)

        def groups(t):
            return t.unflatten(-1, (self.ngroups, self.d_state))

        y = mamba_chunk_scan_combined(
            both(x, x),
            both(delta[:, :, 0], delta[:, :, 1]),
            -torch.exp(to_math_dtype(self.A_log)),
            both(groups(B_f), groups(B_b)),
            both(groups(C_f), groups(C_b)),
            self.chunk_size,
            backend=self.backend,
        )
        # Shift one step later: position t takes the scan's output at t - 1, read from a state without x_t.
        y = F.pad(y[:, :-1], (0, 0, 0, 0, 1, 0))
        y = y[:batch] + y[batch:].flip(1)
        diagonal = self.fc_D(x.flatten(-2)) + self.D.to(x.dtype)
        y = (y + x * diagonal[..., None]).flatten(-2)
        y = self.norm(y, z, backend=backend_for("rmsnorm_fn", self.backend))
        return self.out_proj(y)

    def _centred_conv(self, xBC: torch.Tensor) -> torch.Tensor:
        """silu of the width-``d_conv`` conv centred on each position, zero beyond the ends: (batch, dim, seqlen).

        The causal conv of the input padded with d_conv // 2 zeros on the right,
        read d_conv // 2 steps later, is the centred conv.
        """
        half = self.d_conv // 2
        out = causal_conv1d_fn(
            F.pad(xBC, (0, half)), conv_weight(self.conv1d), self.conv1d.bias, activation="silu", backend=self.backend
        )
        return out[..., half:]
