"""The decode loop of ``MambaLM.generate``, and its CUDA-graph step.

Generation runs in two phases through one ``InferenceCache``:

1. prefill: one forward over the prompt with the cache (the chunked path of every
   mixer), keeping only the last position's logits;
2. decode: one forward per new token with seqlen 1 (every mixer's single-step path).

Prompts of different lengths are batched by padding on the LEFT with an
``attention_mask`` (1 real, 0 pad), so every row's last prompt token sits in the
last column and the new tokens of all rows are appended in the same column.

On the CPU the decode phase takes, by default, the model's fused step
(``model.fused_decoder(cache)``: one C++ call per block instead of ~20 ops), where
the model has one; ``fused_step=False`` keeps the op-by-op forward.

This module knows nothing of MambaLM's internals, and imports no model: it calls
``model(...)``, ``model.allocate_cache(...)`` and, for CUDA graphs,
``model.decode_logits(...)``, and for the fused CPU step ``model.fused_decoder(cache)``
(the causal-LM protocol any family can offer; a model without ``fused_decoder``
decodes op by op).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from lnlm_ssm.generation.sampling import apply_repetition_penalty, sample_next_token
from lnlm_ssm.layers.block_step import FusedStepUnsupported
from lnlm_ssm.layers.cache import InferenceCache

__all__ = ["generate"]


def _check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy); got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no top-k filter); got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filter); got {top_p!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1: none); got {repetition_penalty!r}")


def _check_prompt(input_ids, attention_mask) -> Optional[torch.Tensor]:
    """Validate the prompt's shape and mask (its ids are the embedding's to check); returns the mask as bool (or None)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        got = f"dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int32/int64 tensor; got {got}")
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, seqlen) with seqlen >= 1; got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}; got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    if (mask[:, :-1] & ~mask[:, 1:]).any():
        raise ValueError(
            "attention_mask must pad on the left (a row's zeros before its ones): generation appends on the right"
        )
    if not mask[:, -1].all():
        raise ValueError("attention_mask: every row needs at least its last prompt position real")
    return mask


class _CUDAGraphDecoder:
    """The decode step captured in a CUDA graph: static input ids in, static logits out.

    Capture runs the step (warm-up, then capture) on the cache's own tensors, which
    changes them, so their contents are saved before and restored after. Only models
    whose decode step does not depend on the position are captured: an attention
    layer writes its KV at a position counted in Python, which a replay would not see.
    """

    def __init__(self, model, cache: InferenceCache) -> None:
        saved = [t.clone() for t in cache.tensors()]
        seqlen = cache.seqlen
        self.cache = cache
        self.input_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        side = torch.cuda.Stream(device=cache.device)
        side.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(side):
            # Warm-up on a side stream, as CUDA graph capture requires: kernels are compiled and
            # autotuned here, not during capture.
            for _ in range(2):
                model.decode_logits(self.input_ids, cache.layers)
        torch.cuda.current_stream(cache.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_logits(self.input_ids, cache.layers)
        for tensor, value in zip(cache.tensors(), saved):
            tensor.copy_(value)
        cache.set_seqlen(seqlen)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        self.cache.set_seqlen(self.cache.seqlen + 1)
        return self.logits


def _fused_decoder(model, cache: InferenceCache, required: bool) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """``model.fused_decoder(cache)``, or None where the model has none (an error instead when ``required``)."""
    build = getattr(model, "fused_decoder", None)
    if build is None:
        if required:
            raise ValueError(f"fused_step=True: {type(model).__name__} has no fused decode step (fused_decoder)")
        return None
    try:
        return build(cache)
    except FusedStepUnsupported as err:
        if required:
            raise ValueError(f"fused_step=True: {err}") from err
        return None


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    streamer: Optional[Callable[[torch.Tensor], None]] = None,
    cache: Optional[InferenceCache] = None,
    generator: Optional[torch.Generator] = None,
    cuda_graph: bool = False,
    fused_step: Optional[bool] = None,
) -> torch.Tensor:
    """Continue ``input_ids`` (batch, prompt) by up to ``max_new_tokens``; returns (batch, prompt + new).

    - ``attention_mask`` (batch, prompt): 1 real, 0 padding, padding on the left.
    - ``temperature=0`` or ``top_k=1``: greedy. ``repetition_penalty`` applies to the
      tokens of this call's prompt (padding excluded) and of the new tokens.
    - ``eos_token_id``: a row that emitted it keeps emitting it; generation stops
      early once every row has, so fewer than ``max_new_tokens`` may be returned.
    - ``streamer``: called with each new token tensor (batch,) as it is chosen.
    - ``cache``: continue from an ``InferenceCache`` that has seen earlier tokens
      (chunked prefill; ``input_ids`` are then only the new prompt tokens). It must
      have room for ``cache.seqlen + prompt + max_new_tokens`` positions. Without
      it one is allocated for this call.
    - ``generator``: the torch.Generator sampling draws from (reproducible runs).
    - ``cuda_graph``: on CUDA, replay the decode step as a captured CUDA graph
      (captured once per call; not for models with attention layers).
    - ``fused_step``: on the CPU, decode through ``model.fused_decoder`` (one call per
      block; same tokens, logits within fp32 rounding). None (default): where the
      model has one, else op by op; True: raise if it has none, saying why; False: op by op.
    """
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    mask = _check_prompt(input_ids, attention_mask)
    batch, prompt_len = input_ids.shape
    if cuda_graph:
        if input_ids.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and input_ids on a CUDA device; got {input_ids.device}")
        if "Attention" in model.config.layer_types():
            raise ValueError(
                "cuda_graph=True supports models without attention layers: an attention layer's KV position "
                "is counted in Python, which a graph replay cannot advance"
            )
    if fused_step is not None and not isinstance(fused_step, bool):
        raise TypeError(f"fused_step must be None (auto), True or False; got {fused_step!r}")
    if fused_step and input_ids.device.type != "cpu":
        raise ValueError(f"fused_step=True is the CPU decode step; input_ids are on {input_ids.device}")
    if cache is None:
        cache = model.allocate_cache(batch, prompt_len + max_new_tokens)
    elif not isinstance(cache, InferenceCache):
        raise TypeError(f"cache must be an InferenceCache (model.allocate_cache); got {type(cache).__name__}")
    elif cache.batch_size != batch:
        raise ValueError(f"cache was allocated for batch {cache.batch_size}; input_ids has batch {batch}")
    needed = cache.seqlen + prompt_len + max_new_tokens
    if needed > cache.max_seqlen:
        raise ValueError(
            f"cache has room for max_seqlen={cache.max_seqlen} positions; this call needs {needed} "
            f"({cache.seqlen} seen + {prompt_len} prompt + {max_new_tokens} new)"
        )
    if max_new_tokens == 0:
        return input_ids

    # The prefill comes first: its embedding checks the ids before anything indexes by them.
    logits = model(input_ids, attention_mask=mask, cache=cache, num_last_tokens=1).logits[:, -1]
    seen = None
    if repetition_penalty != 1.0:
        real = torch.ones_like(input_ids) if mask is None else mask.long()
        counts = torch.zeros(batch, model.config.vocab_size, dtype=torch.long, device=input_ids.device)
        seen = counts.scatter_add_(1, input_ids.long(), real) > 0
    step = _CUDAGraphDecoder(model, cache) if cuda_graph else None
    if step is None and fused_step is not False and input_ids.device.type == "cpu":
        step = _fused_decoder(model, cache, required=bool(fused_step))
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for i in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        new_tokens.append(token)
        if streamer is not None:
            streamer(token)
        if i == max_new_tokens - 1 or (eos_token_id is not None and finished.all()):
            break
        token_ids = token[:, None].to(input_ids.dtype)
        if step is not None:
            logits = step(token_ids)
        else:
            logits = model(token_ids, cache=cache, num_last_tokens=1).logits[:, -1]
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1).to(input_ids.dtype)], dim=1)
