"""Tensor parallelism for MambaLM: mixers and MLPs split by heads, embedding and head by vocabulary, over a mesh.

Megatron's scheme, expressed on DTensor and applied with ``parallelize_module``:

- a mixer (Mamba-2 or attention) or gated MLP keeps whole heads, groups and
  MLP channels on each rank (a Mamba-1 mixer, its share of the channels). Its
  fused input projection is sharded *per segment*: Mamba-2's in_proj rows
  ``[z, x, B, C, dt]``, attention's ``[q, k, v]``, Mamba-1's ``[x, z]`` and the
  MLP's ``[value, gate]`` each give rank r their r-th slice, so that the rank's
  rows read ``[z_r, x_r, B_r, C_r, dt_r]``, the layout the unchanged layer
  code splits. Conv channels, A_log, D, dt_bias and the gated norm's weight are
  sharded to match (the norm is per group, and groups do not straddle ranks);
  the output projection is sharded by its input columns (row-wise);
- the layer's input enters the split region by an identity whose backward
  sums the input gradient over the ranks, and its output leaves it by a sum
  over the ranks (one all-reduce per mixer and per MLP, each way); the output
  projection's bias is added once, after the sum;
- the embedding and the LM head are split by vocabulary rows (vocab-parallel,
  torch's ``RowwiseParallel`` and ``ColwiseParallel``; a tied pair stays one
  parameter): each rank looks up the ids in its rows and the lookups are
  summed; its logits are a DTensor sharded by vocabulary, the padding rows at
  -inf, whose cross entropy ``loss_parallel`` takes without gathering them (the
  caller enters it around the forward and the backward; the loss it returns is
  a plain tensor, the same on every rank). The norms are replicated.

Sequence parallelism (``sequence_parallel=True``, Megatron's): between the
split layers, the hidden states and the residual stream are each rank's slice
of the sequence, so the norms (whose weights' gradients are then summed over
the ranks) and the activations they keep are divided too. A mixer or MLP
all-gathers its input along the sequence instead of taking it whole, and
reduce-scatters its output instead of all-reducing it (the same bytes); the
embedding's output is reduce-scattered and the head's input all-gathered.

The layer code is the single-process code: it runs on its parameters' local
shards (a forward pre-hook puts each DTensor parameter's ``to_local()`` in its
place; the post-hook takes it away), with its head counts set to the rank's.
The kernels (scan, conv, gated norm, attention) see plain tensors, so every
backend works; the parameters, their gradients and the optimizer state are
DTensors, which is what ``clip_grad_norm_``, FSDP2 (DP x TP on a 2-D mesh) and
``torch.distributed.checkpoint`` expect.

Collectives per layer and step, forward + backward: two all-reduces of
(tokens, d_model) per mixer and two per MLP (none for the norms). The embedding
and the head add one each of (tokens, d_model), and ``loss_parallel`` three of
(tokens,) in the forward (the max, the sum of exponentials, the label's logit).
A Mamba-1 mixer has two more, of (tokens, dt_rank + 2 * d_state): its x_proj
reduces over all channels mid-layer, so its output is summed over the ranks in
the forward and its gradient in the backward (``MambaChannelParallel``).

A segment-sharded parameter is a DTensor ``Shard(dim)`` of the *permuted*
tensor whose rank-r block is the rank's segments; ``plain_orders`` names the
permutation of each, and ``to_plain``/``from_plain`` convert full state dicts,
so checkpoints hold the plain model's layout.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from lnlm_ssm.layers.attention import Attention
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2
from lnlm_ssm.layers.mlp import GatedMLP
from lnlm_ssm.models.causal_lm import MambaLM
from lnlm_ssm.models.config import MambaLMConfig

__all__ = [
    "HeadParallel",
    "MambaChannelParallel",
    "ReplicatedParallel",
    "TensorParallelError",
    "check_tensor_parallel",
    "from_plain",
    "plain_orders",
    "tensor_parallel",
    "to_plain",
]

# The attribute a sharded module keeps its parameters' permutations in (see plain_orders).
_ORDERS = "_tensor_parallel_orders"


class TensorParallelError(ValueError):
    """A model that cannot be split over the asked number of ranks."""


def check_tensor_parallel(config: MambaLMConfig, tp: int) -> None:
    """Raise a TensorParallelError naming the config field that ``tp`` ranks cannot split."""
    if tp == 1:
        return
    types = set(config.layer_types())
    fields: list[tuple[str, int]] = []
    if "Mamba1" in types:
        probe = Mamba(config.d_model, **{k: v for k, v in config.ssm_cfg.items() if k != "layer"}, device="meta")
        fields.append(("ssm_cfg d_inner (expand * d_model)", probe.d_inner))
    if "Mamba2" in types:
        probe = Mamba2(config.d_model, **{k: v for k, v in config.ssm_cfg.items() if k != "layer"}, device="meta")
        fields += [("ssm_cfg nheads (expand * d_model // headdim)", probe.nheads), ("ssm_cfg ngroups", probe.ngroups)]
    if "Attention" in types:
        probe = Attention(config.d_model, **config.attn_cfg, device="meta")
        fields += [("attn_cfg num_heads", probe.num_heads), ("attn_cfg num_heads_kv", probe.num_heads_kv)]
    fields.append(("vocab_size padded to a multiple of pad_vocab_size_multiple", config.padded_vocab_size))
    if config.d_intermediate > 0:
        hidden = GatedMLP(config.d_model, hidden_features=config.d_intermediate, device="meta").fc2.in_features
        fields.append(("d_intermediate (rounded up to a multiple of 128)", hidden))
    for name, value in fields:
        if value % tp:
            raise TensorParallelError(
                f"{name} = {value} must be divisible by tensor_parallel = {tp}: each rank holds whole heads and groups"
            )


def _segment_order(sizes: tuple[int, ...], parts: int) -> torch.Tensor:
    """Indices that reorder a dimension made of segments ``sizes`` so that block r is every segment's r-th slice."""
    starts = torch.tensor((0,) + sizes[:-1]).cumsum(0).tolist()
    return torch.cat([
        torch.arange(start + r * (size // parts), start + (r + 1) * (size // parts))
        for r in range(parts)
        for start, size in zip(starts, sizes)
    ])


def _enter(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """``x`` itself; its gradient is summed over the ranks (each rank's heads contribute a part)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _leave(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The sum over the ranks of their partial outputs ``x``; the gradient passes to each as it is."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def _gather_sequence(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The whole sequence from each rank's slice ``x`` (dim 1); the gradient is summed and sliced again."""
    dtensor = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
    return dtensor.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def _scatter_sequence(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's slice (dim 1) of the sum over the ranks of their partial outputs ``x``."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()


class _LocalViews:
    """Forward hooks that show ``module``'s code the local shards of the DTensor parameters below it.

    ``partial_grads``: the code sees only this rank's slice of the sequence, so
    the gradient of a replicated parameter is one part of the whole.
    """

    def __init__(self, module: nn.Module, hidden: tuple[str, ...] = (), partial_grads: bool = False) -> None:
        self.module = module
        self.hidden = hidden  # parameters the code must not see (a bias added after the reduction)
        self.grad_placements = [Partial()] if partial_grads else None
        self.views: dict[str, Optional[torch.Tensor]] = {}

    def show(self) -> None:
        for name, param in self.module.named_parameters():
            if isinstance(param, DTensor):
                replicated = param.placements[0].is_replicate()
                grads = self.grad_placements if replicated else None
                self.views[name] = None if name in self.hidden else param.to_local(grad_placements=grads)
        for name, view in self.views.items():
            owner, _, attr = name.rpartition(".")
            # Plain attributes win over nn.Module.__getattr__'s parameter lookup: the layer reads the view.
            self.module.get_submodule(owner).__dict__[attr] = view

    def hide(self) -> None:
        for name in self.views:
            owner, _, attr = name.rpartition(".")
            self.module.get_submodule(owner).__dict__.pop(attr, None)
        self.views = {}

    def register(self, pre=None, post=None) -> None:
        def pre_hook(module, args):
            self.show()
            return None if pre is None else pre(args)

        def post_hook(module, args, output):
            try:
                return None if post is None else post(output)
            finally:
                self.hide()

        self.module.register_forward_pre_hook(pre_hook)
        # always_call: a forward that raised must not leave the views shadowing the parameters.
        self.module.register_forward_hook(post_hook, always_call=True)


def _distribute(module: nn.Module, name: str, mesh: DeviceMesh, placement, order=None) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    param = owner._parameters[attr]
    data = param.detach()
    if order is not None:
        data = data.index_select(placement.dim, order.to(data.device))
    # Rank 0's values, scattered or broadcast: ranks that drew other initial weights start from one model.
    dtensor = distribute_tensor(data, mesh, [placement], src_data_rank=0)
    owner.register_parameter(attr, nn.Parameter(dtensor, requires_grad=param.requires_grad))


class HeadParallel(ParallelStyle):
    """Split a mixer or gated MLP by heads (see the module docstring); ``parallelize_module``'s style for it.

    ``shards`` maps a parameter name (below the module) to ``(dim, segments)``:
    the dimension it is split along and the sizes of the segments that are
    split one by one (one segment: a plain even split). ``after_reduce`` names
    the output projection's bias, added once after the sum over ranks. Other
    parameters are replicated. ``local`` maps attributes of the module to the
    values its code must use on one rank (its head counts). ``sequence_parallel``:
    the input and output are this rank's slice of the sequence (dim 1): the
    input is all-gathered and the output reduce-scattered instead of all-reduced.
    """

    def __init__(self, shards: dict[str, tuple[int, tuple[int, ...]]], after_reduce: Optional[str],
                 local: dict[str, Any], sequence_parallel: bool = False) -> None:
        super().__init__()
        self.shards, self.after_reduce, self.local = shards, after_reduce, local
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        parts = device_mesh.size()
        orders = {}
        for name, _ in list(module.named_parameters()):
            if name in self.shards:
                dim, segments = self.shards[name]
                order = _segment_order(segments, parts) if len(segments) > 1 else None
                _distribute(module, name, device_mesh, Shard(dim), order)
                if order is not None:
                    orders[name] = (dim, order)
            else:
                _distribute(module, name, device_mesh, Replicate())
        setattr(module, _ORDERS, orders)
        for attr, value in self.local.items():
            setattr(module, attr, value)
        views = _LocalViews(module, hidden=(self.after_reduce,) if self.after_reduce else ())

        sequence = self.sequence_parallel

        def enter(args):
            return ((_gather_sequence if sequence else _enter)(args[0], device_mesh), *args[1:])

        def leave(output):
            output = (_scatter_sequence if sequence else _leave)(output, device_mesh)
            if self.after_reduce is not None:
                owner, _, attr = self.after_reduce.rpartition(".")
                # _parameters, not getattr: the view hides the bias from the layer code until now.
                bias = module.get_submodule(owner)._parameters[attr]
                bias = bias.to_local(grad_placements=[Partial()] if sequence else None)
                output = output + bias.to(output.dtype)
            return output

        views.register(pre=enter, post=leave)
        return module


class ReplicatedParallel(ParallelStyle):
    """Replicate a module's parameters over the mesh (as DTensors) and run its code on their local copies;
    ``sequence_parallel``: on this rank's slice of the sequence (their gradients then summed over the ranks)."""

    def __init__(self, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, _ in list(module.named_parameters()):
            _distribute(module, name, device_mesh, Replicate())
        _LocalViews(module, partial_grads=self.sequence_parallel).register()
        return module


def _mamba2_style(mixer: Mamba2, tp: int) -> HeadParallel:
    d_inner, group_dim, nheads = mixer.d_inner, mixer.ngroups * mixer.d_state, mixer.nheads
    in_segments = (d_inner, d_inner, group_dim, group_dim, nheads)
    conv_segments = (d_inner, group_dim, group_dim)
    shards = {
        "in_proj.weight": (0, in_segments),
        "in_proj.bias": (0, in_segments),
        "conv1d.weight": (0, conv_segments),
        "conv1d.bias": (0, conv_segments),
        "dt_bias": (0, (nheads,)),
        "A_log": (0, (nheads,)),
        "D": (0, (mixer.D.shape[0],)),
        "norm.weight": (0, (d_inner,)),
        "out_proj.weight": (1, (d_inner,)),
    }
    local = dict(
        d_inner=d_inner // tp, nheads=nheads // tp, ngroups=mixer.ngroups // tp, conv_dim=mixer.conv_dim // tp
    )
    return HeadParallel(shards, "out_proj.bias" if mixer.out_proj.bias is not None else None, local)


def _attention_style(mixer: Attention, tp: int) -> HeadParallel:
    q, kv = mixer.num_heads * mixer.head_dim, mixer.num_heads_kv * mixer.head_dim
    shards = {
        "in_proj.weight": (0, (q, kv, kv)),
        "in_proj.bias": (0, (q, kv, kv)),
        "out_proj.weight": (1, (q,)),
    }
    local = dict(num_heads=mixer.num_heads // tp, num_heads_kv=mixer.num_heads_kv // tp)
    return HeadParallel(shards, "out_proj.bias" if mixer.out_proj.bias is not None else None, local)


class _SplitMamba(Mamba):
    """A Mamba-1 mixer whose channels are split over ``_tp_mesh``: x_proj's partial outputs are summed."""

    _tp_mesh: DeviceMesh

    def _x_dbl(self, x: torch.Tensor) -> torch.Tensor:
        # Each rank's channels give a part of dt, B and C: sum them (forward); the whole dt, B and C then feed
        # every rank's channels, whose gradients are summed in turn (backward).
        return _enter(_leave(super()._x_dbl(x), self._tp_mesh), self._tp_mesh)


class MambaChannelParallel(HeadParallel):
    """Split a Mamba-1 mixer by channels; ``parallelize_module``'s style for it.

    Mamba-1 is per channel from in_proj to out_proj but for x_proj, which
    reduces all channels to ``dt_rank + 2 * d_state`` values per token. So
    in_proj is column-wise per segment (``[x, z]``), the conv, dt_proj (by its
    output channels), A_log and D are sharded to match, x_proj and out_proj are
    row-wise, and x_proj's output is summed over the ranks mid-layer: the
    layer's class becomes a subclass whose ``_x_dbl`` does it.
    """

    def __init__(self, mixer: Mamba, tp: int) -> None:
        d_inner = mixer.d_inner
        shards = {
            "in_proj.weight": (0, (d_inner, d_inner)),
            "in_proj.bias": (0, (d_inner, d_inner)),
            "conv1d.weight": (0, (d_inner,)),
            "conv1d.bias": (0, (d_inner,)),
            "x_proj.weight": (1, (d_inner,)),
            "dt_proj.weight": (0, (d_inner,)),
            "dt_proj.bias": (0, (d_inner,)),
            "A_log": (0, (d_inner,)),
            "D": (0, (d_inner,)),
            "out_proj.weight": (1, (d_inner,)),
        }
        after_reduce = "out_proj.bias" if mixer.out_proj.bias is not None else None
        super().__init__(shards, after_reduce, dict(d_inner=d_inner // tp))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        module.__class__ = _SplitMamba  # as FSDP2's fully_shard swaps the class: same module, one method more
        module._tp_mesh = device_mesh
        return module


def _mlp_style(mlp: GatedMLP) -> HeadParallel:
    hidden = mlp.fc2.in_features
    shards = {"fc1.weight": (0, (hidden, hidden)), "fc1.bias": (0, (hidden, hidden)), "fc2.weight": (1, (hidden,))}
    return HeadParallel(shards, "fc2.bias" if mlp.fc2.bias is not None else None, {})


_MIXER_STYLES = {Mamba: MambaChannelParallel, Mamba2: _mamba2_style, Attention: _attention_style}


def tensor_parallel(model: nn.Module, mesh: DeviceMesh, *, sequence_parallel: bool = False) -> nn.Module:
    """Split a ``MambaLM`` over the 1-D ``mesh`` in place (see the module docstring); returns it.

    Every rank must build the same model (rank 0's values are the ones kept).
    Checks the config first (``check_tensor_parallel``). Make the optimizer after.
    The model's logits are then a DTensor sharded by vocabulary: take its loss
    (``labels=``) inside ``torch.distributed.tensor.parallel.loss_parallel()``,
    forward and backward.

    ``sequence_parallel``: between the mixers and MLPs, the hidden states and
    the residual stream are split along the sequence (dim 1), so that each rank
    keeps and normalises its slice only; the inputs' seqlen must then be a
    multiple of the mesh size, and the model must have no learned positions.
    """
    if not isinstance(model, MambaLM):
        raise TensorParallelError(f"tensor parallelism splits MambaLM models; got a {type(model).__name__}")
    if sequence_parallel and model.backbone.position_embedding is not None:
        raise TensorParallelError(
            "sequence parallelism splits the hidden states along the sequence, which learned positions "
            "(max_position_embeddings) are added to whole: give sequence_parallel=False"
        )
    if mesh.ndim != 1:
        raise ValueError(f"mesh must be the 1-D tensor-parallel mesh; got {mesh.ndim} dimensions")
    tp = mesh.size()
    check_tensor_parallel(model.config, tp)
    between = Shard(1) if sequence_parallel else Replicate()  # the hidden states between the split layers
    plan: dict[str, ParallelStyle] = {
        "backbone.embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
        "backbone.norm_f": ReplicatedParallel(sequence_parallel),
        "lm_head": ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False),
    }
    for i, block in enumerate(model.backbone.layers):
        plan[f"backbone.layers.{i}.norm"] = ReplicatedParallel(sequence_parallel)
        plan[f"backbone.layers.{i}.mixer"] = _MIXER_STYLES[type(block.mixer)](block.mixer, tp)
        if block.mlp is not None:
            plan[f"backbone.layers.{i}.norm2"] = ReplicatedParallel(sequence_parallel)
            plan[f"backbone.layers.{i}.mlp"] = _mlp_style(block.mlp)
    for style in plan.values():
        if isinstance(style, HeadParallel):
            style.sequence_parallel = sequence_parallel
    parallelize_module(model, mesh, plan)
    config = model.config
    if config.tie_embeddings:  # the head was split as a copy: one parameter again, the embedding's
        model.lm_head.weight = model.backbone.embedding.weight
    model.__class__ = _VocabParallelLM  # as FSDP2's fully_shard swaps the class: same module, its logits split
    model._vocab_padding = None
    if config.padded_vocab_size > config.vocab_size:
        padding = torch.zeros(config.padded_vocab_size, device=model.lm_head.weight.device)
        padding[config.vocab_size:] = float("-inf")
        model._vocab_padding = distribute_tensor(padding, mesh, [Shard(0)])
    return model


class _VocabParallelLM(MambaLM):
    """A MambaLM whose embedding and LM head are split by vocabulary rows (see the module docstring).

    ``logits`` is a DTensor sharded by vocabulary, the padding rows' logits
    -inf (they take no probability, as when the plain model leaves them out);
    the loss is taken on it under ``loss_parallel``, which the caller enters
    around the forward and the backward, and returned as a plain tensor: the
    whole value on every rank.
    """

    _vocab_padding: Optional[DTensor]

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        return logits if self._vocab_padding is None else logits + self._vocab_padding

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss.to_local()
        return out


def plain_orders(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """``{parameter name: (dim, order)}`` of the segment-sharded parameters of ``model``.

    The full tensor of such a DTensor is ``plain.index_select(dim, order)``. The
    names are ``model.named_parameters()``'s without wrappers' prefixes (the keys
    of ``torch.distributed.checkpoint``'s state dicts).
    """
    found = {}
    for prefix, module in model.named_modules():
        for name, order in getattr(module, _ORDERS, {}).items():
            key = f"{prefix}.{name}" if prefix else name
            found[_clean(key)] = order
    return found


_WRAPPERS = ("module", "_checkpoint_wrapped_module", "_orig_mod")


def _clean(name: str) -> str:
    # DDP's, activation checkpointing's and torch.compile's wrappers: not in checkpoint keys.
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def to_plain(tensors: dict[str, Any], orders: dict[str, tuple[int, torch.Tensor]]) -> dict[str, Any]:
    """Full tensors of segment-sharded parameters (``tensors[name]``, or a dict of them such as Adam's state)
    put back in the plain layout; other entries as they are."""
    return {name: _permute(value, orders.get(name), inverse=True) for name, value in tensors.items()}


def from_plain(tensors: dict[str, Any], orders: dict[str, tuple[int, torch.Tensor]]) -> dict[str, Any]:
    """The inverse of ``to_plain``: plain-layout tensors in the order the sharded parameters hold them."""
    return {name: _permute(value, orders.get(name), inverse=False) for name, value in tensors.items()}


def _permute(value: Any, order: Optional[tuple[int, torch.Tensor]], inverse: bool) -> Any:
    if order is None:
        return value
    if isinstance(value, dict):  # an optimizer's per-parameter state: moments shaped as the parameter
        return {k: _permute(v, order, inverse) for k, v in value.items()}
    dim, index = order
    if not isinstance(value, torch.Tensor) or value.ndim <= dim or value.shape[dim] != index.numel():
        return value  # Adam's step count
    if inverse:
        index = torch.empty_like(index).scatter_(0, index, torch.arange(index.numel()))
    return value.index_select(dim, index.to(value.device))
