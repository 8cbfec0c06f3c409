"""Model parallelism beside data parallelism: how the ranks of a run are laid out, and the mesh they form.

A run of ``world_size`` processes is ``pipeline x data x tensor`` ranks, the
tensor-parallel ranks innermost (on one node they share the fastest links)::

    layout = Layout.of(info, tensor=2, pipeline=1)   # world 4: data 2 x tensor 2
    layout.mesh["tp"], layout.mesh["dp"]             # the 1-D meshes of each kind

``tensor`` (``parallel.tensor``) splits each layer's heads; ``pipeline``
(``parallel.pipeline``) splits the stack of blocks; the data-parallel ranks
(DDP or FSDP2, ``training.distributed``) each take their slice of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lnlm_ssm.utils.checks import check_positive_int

__all__ = ["Layout"]

MESH_DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class Layout:
    """This rank's place in a ``pipeline x data x tensor`` layout; ``mesh`` is None in a single process."""

    tensor: int
    pipeline: int
    data: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    mesh: Optional[DeviceMesh]

    @classmethod
    def of(cls, info, *, tensor: int = 1, pipeline: int = 1) -> "Layout":
        """The layout of ``info`` (``training.distributed.setup()``'s DistInfo) with ``tensor`` x ``pipeline``
        model-parallel ranks; the rest of the world is data parallel."""
        check_positive_int("tensor_parallel", tensor)
        check_positive_int("pipeline_parallel", pipeline)
        data, rest = divmod(info.world_size, tensor * pipeline)
        if rest or not data:
            raise ValueError(
                f"the number of processes ({info.world_size}) must be a multiple of tensor_parallel x "
                f"pipeline_parallel ({tensor} x {pipeline})"
            )
        rank = info.rank
        mesh = None
        if info.world_size > 1:
            mesh = init_device_mesh(info.device.type, (pipeline, data, tensor), mesh_dim_names=MESH_DIMS)
        return cls(
            tensor=tensor,
            pipeline=pipeline,
            data=data,
            tp_rank=rank % tensor,
            dp_rank=rank // tensor % data,
            pp_rank=rank // (tensor * data),
            mesh=mesh,
        )
