"""lm-evaluation-harness adapter: our checkpoints as the lm-eval model ``"lnlm_ssm"``.

Importing this module registers the model with lm-eval, so that the harness's own
entry points work as they do for ``hf``::

    lm_eval --model lnlm_ssm --model_args pretrained=runs/demo/model,dtype=float32 --tasks lambada_openai

(after ``import lnlm_ssm.evaluation``, or through ``lnlm-ssm eval``). The three
request types are served the way lm-eval's ``hf`` backend serves them, so that
per-sample log-likelihoods agree with it on the same weights:

- ``loglikelihood``: context and continuation are tokenised together and split
  (lm-eval's ``TemplateLM``), truncated on the left to ``max_length + 1`` tokens;
  an empty context is the prefix token (the tokenizer's eos: our tokenizers have
  no bos), as in ``hf``;
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length``;
- ``generate_until``: our ``generate`` (greedy unless the task asks to sample),
  cut at the first stop string.

Requests are batched longest first and padded on the left with an attention mask,
which our models take without the padding reaching any state or score.
Causal models only for now; encoder and seq2seq families follow with their issues.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

try:
    import lm_eval
    # lm-eval fills its model registry with its own backends (hf, vllm, ...) only while the
    # registry is empty: list them before adding ours, or registering ours would hide them.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:
    raise ImportError(
        "lnlm_ssm.evaluation needs lm-evaluation-harness: pip install 'lnlm_ssm[eval]' (or pip install lm-eval)"
    ) from exc

from lnlm_ssm.data.tokenizers import load_tokenizer
from lnlm_ssm.models.causal_lm import MambaLM
from lnlm_ssm.models.registry import from_pretrained
from lnlm_ssm.utils.checks import check_positive_int
from lnlm_ssm.utils.files import atomic_write

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


@register_model("lnlm_ssm")
class LnlmSsmLM(TemplateLM):
    """An lnlm_ssm causal checkpoint behind lm-eval's ``LM`` interface.

    ``model_args`` (all strings on lm-eval's command line): ``pretrained`` (a
    checkpoint directory or hub repo id, with its tokenizer), ``dtype``
    (float32, bfloat16, float16 or auto: as stored), ``device`` (default cuda
    when available, else cpu), ``batch_size`` and ``max_length`` (default 2048
    tokens per scored window).
    """

    def __init__(
        self,
        pretrained: str,
        dtype: str = "float32",
        device: Optional[str] = None,
        batch_size: Union[int, str] = 1,
        max_length: Union[int, str] = 2048,
        **unused: Any,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if str(batch_size) == "auto" or str(batch_size).startswith("auto:"):
            raise ValueError("batch_size='auto' is not supported by the lnlm_ssm model: give a number")
        self.batch_size = check_positive_int("batch_size", int(batch_size))
        self._max_length = check_positive_int("max_length", int(max_length))
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = from_pretrained(pretrained, device=self.device, dtype=DTYPES[dtype])
        if not isinstance(model, MambaLM):
            raise ValueError(
                f"{pretrained} holds a {type(model).__name__}; the lnlm_ssm lm-eval model serves causal LMs (MambaLM)"
            )
        self.model = model.eval()
        self.tokenizer = load_tokenizer(pretrained)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {pretrained} has no end-of-sequence token, which lm-eval needs")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        # Our tokenizers add no special tokens, as lm-eval's hf backend asks of causal models.
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request.

        ``requests``: ``(cache key, context ids, continuation ids)``.
        """
        too_long = max(len(continuation) for _, _, continuation in requests)
        if too_long > self.max_length:
            raise ValueError(
                f"a continuation of {too_long} tokens does not fit in max_length={self.max_length}: "
                "raise max_length (a model_arg)"
            )
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in batch]
            logprobs = self._log_softmax(rows)
            for row, i in enumerate(batch):
                key, _, continuation = requests[i]
                scored = logprobs[row, -len(continuation) :]
                target = torch.tensor(continuation, device=scored.device)
                answer = (float(scored.gather(-1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _log_softmax(self, rows: list[list[int]]) -> torch.Tensor:
        """fp32 log-probabilities (batch, longest, vocab) of token rows, left-padded so that they end together."""
        ids, mask = self._left_padded(rows)
        return F.log_softmax(self.model(ids, attention_mask=mask).logits.float(), dim=-1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (string,) in (req.args for req in requests):
            windows = [
                (None,) + make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task sets ``do_sample``) continuations, cut at the first stop string.

        Requests with the same generation settings are batched, longest context first, left-padded.
        """
        outputs: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            keep = max(1, self.max_length - max_new)
            contexts = {i: self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in members}
            members = sorted(members, key=lambda i: -len(contexts[i]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                ids, mask = self._left_padded([contexts[i] for i in batch])
                out = self.model.generate(
                    ids, attention_mask=mask, max_new_tokens=max_new, temperature=temperature,
                    eos_token_id=self.eot_token_id,
                )
                for row, i in enumerate(batch):
                    new = out[row, ids.shape[1] :].tolist()
                    if self.eot_token_id in new:
                        new = new[: new.index(self.eot_token_id)]
                    text = self.tok_decode(new)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    outputs[i] = text
        return outputs

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention_mask), both (batch, longest) on the model's device, rows ending together."""
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, longest - len(row) :] = torch.tensor(row)
            mask[r, longest - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)


def evaluate(
    model: Union[str, os.PathLike],
    tasks: Sequence[str],
    *,
    out: Union[str, os.PathLike],
    include_path: Optional[Union[str, os.PathLike]] = None,
    limit: Optional[int] = None,
    batch_size: int = 1,
    device: Optional[str] = None,
    dtype: str = "float32",
    max_length: int = 2048,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the checkpoint ``model``; write ``out/results.json`` (lm-eval's results dict).

    ``include_path``: a directory of extra task YAML files (lm-eval's
    ``--include_path``). ``limit``: at most this many documents per task.
    Returns lm-eval's results dict (per-sample outputs under ``"samples"``).
    """
    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task")
    task_manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown} (check the names, or --include-path for local task YAMLs)")
    results = lm_eval.simple_evaluate(
        model="lnlm_ssm",
        model_args={"pretrained": str(model), "dtype": dtype, "max_length": max_length},
        tasks=list(tasks),
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=task_manager,
        log_samples=True,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    return results
