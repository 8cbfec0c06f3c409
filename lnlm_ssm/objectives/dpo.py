"""Direct preference optimisation (Rafailov et al. 2023), the sigmoid loss, with a shared prompt.

With ``pi`` the policy's and ``ref`` the frozen reference's summed log-probability
of a completion given its prompt, and ``h = beta * ((pi_c - ref_c) - (pi_r - ref_r))``::

    loss = -(1 - label_smoothing) * logsigmoid(h) - label_smoothing * logsigmoid(-h)

(label smoothing: the conservative DPO of Mitchell 2023). Logged: ``reward_chosen``
= beta (pi_c - ref_c), ``reward_rejected``, ``reward_margin`` (their difference) and
``reward_accuracy`` (the share of pairs whose chosen reward is the larger).

Shared prefix: the prompt of a pair runs once; its cache (SSM states, attention
keys and values), kept with its autograd graph (``allocate_cache(track_grad=True)``),
is repeated for the two completions, which continue from it as one batch. Gradients
reach the prompt through the scans' initial states and the cached keys/values. It
computes what two full forwards of ``[prompt; chosen]`` and ``[prompt; rejected]``
compute (``completion_logprobs(..., shared_prefix=False)``), for less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.data.finetune import pair_sequences
from lnlm_ssm.objectives.base import ObjectiveOutput
from lnlm_ssm.objectives.finetune import FinetuneObjective


def completion_logprobs(model: nn.Module, batch, *, shared_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities (batch,) of the chosen and of the rejected completions given their prompts.

    ``model``: a causal LM with ``allocate_cache`` (MambaLM); ``batch``: a pairs batch (``data.finetune``).
    """
    prompt = batch["prompt_ids"]
    completions = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    completion_mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    rows, prompt_len = prompt.shape
    width = completions.shape[1]
    if shared_prefix:
        # Under DDP the wrapper runs the forwards; the cache is the wrapped model's.
        owner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        cache = owner.allocate_cache(rows, prompt_len + width, track_grad=torch.is_grad_enabled())
        # The prompt's last position predicts each completion's first token.
        first = model(prompt, attention_mask=batch["prompt_mask"], cache=cache, num_last_tokens=1).logits
        if any(layer.seqlen != prompt_len for layer in cache.layers):
            # FSDP2 rebuilds the dataclass arguments of the blocks it wraps: they write copies of the cache.
            raise ValueError(
                "the model's layers did not fill the cache they were given (a wrapper such as FSDP copies its "
                "arguments), so the completions cannot continue from the prompt: use shared_prefix=False "
                "(--no-dpo-shared-prefix)"
            )
        both = torch.arange(rows, device=prompt.device).repeat(2)
        cache = cache.select(both)
        rest = model(completions[:, :-1], attention_mask=completion_mask[:, :-1], cache=cache).logits
        logits = torch.cat([first.index_select(0, both), rest], dim=1)
    else:
        input_ids, mask = pair_sequences(batch)
        logits = model(input_ids, attention_mask=mask).logits[:, prompt_len - 1 : prompt_len + width - 1]
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    token_logp = logp.gather(-1, completions[..., None]).squeeze(-1) * completion_mask.to(torch.float32)
    return token_logp.sum(dim=1).chunk(2)


class DPOObjective(FinetuneObjective):
    """Rows ``{"prompt", "chosen", "rejected"}``; the reference is the loop's frozen starting model
    (or ``--ref-model``). ``shared_prefix=False``: two full forwards per pair (for comparison)."""

    name = "dpo"
    architectures = ("MambaLM",)
    data_format = "pairs"
    options = {"beta": "dpo_beta", "label_smoothing": "dpo_label_smoothing", "shared_prefix": "dpo_shared_prefix"}
    needs_reference = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, *, shared_prefix: bool = True) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0; got {beta!r}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing!r}")
        self.beta, self.label_smoothing, self.shared_prefix = beta, label_smoothing, shared_prefix

    def __call__(self, model: nn.Module, batch) -> ObjectiveOutput:
        if self.reference is None:
            raise RuntimeError("DPO needs its reference model: set objective.reference (the loop does)")
        policy_chosen, policy_rejected = completion_logprobs(model, batch, shared_prefix=self.shared_prefix)
        with torch.no_grad():
            ref_chosen, ref_rejected = completion_logprobs(self.reference, batch, shared_prefix=self.shared_prefix)
        chosen = self.beta * (policy_chosen - ref_chosen)
        rejected = self.beta * (policy_rejected - ref_rejected)
        h = chosen - rejected
        smoothing = self.label_smoothing
        loss = (-(1 - smoothing) * F.logsigmoid(h) - smoothing * F.logsigmoid(-h)).mean()
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
            "reward_accuracy": (chosen > rejected).to(torch.float32).mean(),
            "reward_margin": (chosen - rejected).mean(),
        }
        return ObjectiveOutput(loss=loss, metrics=metrics)
