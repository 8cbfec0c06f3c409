"""lm-evaluation-harness: the "lnlm_ssm" model gives the per-sample log-likelihoods of lm-eval's own ``hf``
backend on the same weights (an HF MambaForCausalLM checkpoint), on local tasks that need no download."""

import json
import os
import textwrap
from pathlib import Path

import pytest

# No hub look-ups: the tasks read local JSONL, the models local directories.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate")

from lm_eval.api.instance import Instance  # noqa: E402

import lnlm_ssm.evaluation  # noqa: E402,F401  (registers the model)
from lnlm_ssm import MambaLM  # noqa: E402
from lnlm_ssm.cli import main  # noqa: E402
from lnlm_ssm.data.tokenizers import save_tokenizer_kind  # noqa: E402
from lnlm_ssm.evaluation import LnlmSsmLM  # noqa: E402

EOS = "<|endoftext|>"
TEXT = [
    "the cat sat on the mat and the dog sat on the log",
    "a bird in the hand is worth two in the bush",
    "all that glitters is not gold, said the old man to the cat",
    "to be or not to be, that is the question of the day",
]
QUESTIONS = [
    {"question": "the cat sat on the", "choices": [" mat", " log", " moon"], "answer": 0},
    {"question": "a bird in the hand is worth", "choices": [" two", " three"], "answer": 0},
    {"question": "all that glitters is", "choices": [" not gold", " gold", " silver"], "answer": 0},
]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """An HF MambaForCausalLM with a small BPE tokenizer.json, saved as HF saves them."""
    directory = tmp_path_factory.mktemp("hf-mamba")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TEXT * 4, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.MambaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        eos_token_id=fast.eos_token_id, bos_token_id=None, pad_token_id=fast.eos_token_id,
    )
    model = transformers.MambaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two local lm-eval tasks: multiple choice, and rolling log-likelihood (perplexity)."""
    directory = tmp_path_factory.mktemp("tasks")
    (directory / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (directory / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    (directory / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {directory / "mc.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
    """))
    (directory / "tiny_ppl.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_ppl
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {directory / "text.jsonl"}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
    """))
    return directory


def run(model, model_args, tasks, batch_size):
    manager = lm_eval.tasks.TaskManager(include_path=str(tasks), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["tiny_mc", "tiny_ppl"], task_manager=manager,
        batch_size=batch_size, device="cpu", log_samples=True,
    )


def per_sample(results, task):
    """Each sample's log-likelihoods: one per choice ((ll, is_greedy) responses) or per text (ll responses)."""

    def loglikelihood(response):
        return float(response[0] if isinstance(response, (tuple, list)) else response)

    return [[loglikelihood(resp[0]) for resp in sample["resps"]] for sample in results["samples"][task]]


@pytest.mark.parametrize("batch_size, max_length", [(1, 2048), (3, 2048), (2, 8)])
def test_per_sample_loglikelihoods_equal_lm_evals_hf_backend(hf_checkpoint, tasks, batch_size, max_length):
    # max_length 8 cuts every text into several rolling windows and truncates long contexts on the left.
    args = {"pretrained": str(hf_checkpoint), "dtype": "float32", "max_length": max_length}
    ours = run("lnlm_ssm", args, tasks, batch_size)
    theirs = run("hf", args, tasks, 1)
    for task, count in (("tiny_mc", sum(len(q["choices"]) for q in QUESTIONS)), ("tiny_ppl", len(TEXT))):
        a, b = per_sample(ours, task), per_sample(theirs, task)
        assert sum(map(len, a)) == count
        assert torch.allclose(torch.tensor(sum(a, [])), torch.tensor(sum(b, [])), rtol=0, atol=1e-3), (task, a, b)
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(hf_checkpoint):
    lm = LnlmSsmLM(pretrained=str(hf_checkpoint), batch_size=2)
    contexts = ["the cat sat", "a bird in the hand is worth"]
    requests = [Instance("generate_until", {}, (c, {"until": ["zzz"], "max_gen_toks": 6}), i) for i, c in enumerate(contexts)]
    texts = lm.generate_until(requests)
    for context, text in zip(contexts, texts):
        ids = torch.tensor([lm.tok_encode(context)])
        expected = lm.model.generate(ids, max_new_tokens=6, temperature=0, eos_token_id=lm.eot_token_id)
        new = expected[0, ids.shape[1]:].tolist()
        new = new[: new.index(lm.eot_token_id)] if lm.eot_token_id in new else new
        assert text == lm.tok_decode(new)
    assert len(texts[0]) >= 3
    stop = texts[0][1:3]
    cut = lm.generate_until([Instance("generate_until", {}, (contexts[0], {"until": [stop], "max_gen_toks": 6}), 0)])
    assert cut == [texts[0][: texts[0].index(stop)]]


def test_a_continuation_longer_than_max_length_is_an_error(hf_checkpoint):
    lm = LnlmSsmLM(pretrained=str(hf_checkpoint), max_length=4)
    request = [Instance("loglikelihood", {}, ("the cat", " sat on the mat and the dog"), 0)]
    with pytest.raises(ValueError, match=r"continuation of \d+ tokens does not fit in max_length=4"):
        lm.loglikelihood(request)


def test_bad_model_args_are_errors(hf_checkpoint):
    with pytest.raises(ValueError, match="dtype must be one of"):
        LnlmSsmLM(pretrained=str(hf_checkpoint), dtype="int8")
    with pytest.raises(ValueError, match="batch_size='auto' is not supported"):
        LnlmSsmLM(pretrained=str(hf_checkpoint), batch_size="auto")


def test_cli_eval_writes_results_and_prints_the_table(hf_checkpoint, tasks, tmp_path, capsys):
    code = main(["eval", "--model", str(hf_checkpoint), "--tasks", "tiny_mc,tiny_ppl", "--include-path", str(tasks),
                 "--limit", "2", "--out", str(tmp_path / "eval")])
    assert code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["results"]) == {"tiny_mc", "tiny_ppl"}
    assert len(results["samples"]["tiny_mc"]) == 2
    out = capsys.readouterr().out
    assert "tiny_mc" in out and "acc" in out and "bits_per_byte" in out
    assert main(["eval", "--model", str(hf_checkpoint), "--tasks", "no_such_task", "--include-path", str(tasks),
                 "--out", str(tmp_path / "x")]) == 2


def test_the_example_tasks_of_the_readme_run(tmp_path, monkeypatch, capsys):
    # README: `lnlm-ssm eval --model runs/demo/model --tasks python_mc,python_ppl --include-path examples/lm_eval`.
    repo = Path(__file__).resolve().parents[2]
    MambaLM.from_name("mamba-tiny", n_layer=1).save_pretrained(tmp_path / "model")
    save_tokenizer_kind(tmp_path / "model", "byte")
    monkeypatch.chdir(repo)  # the tasks' data paths are relative to the repository root
    code = main(["eval", "--model", str(tmp_path / "model"), "--tasks", "python_mc,python_ppl",
                 "--include-path", "examples/lm_eval", "--limit", "2", "--out", str(tmp_path / "eval")])
    assert code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert 0 <= results["python_mc"]["acc,none"] <= 1 and results["python_ppl"]["bits_per_byte,none"] > 0
