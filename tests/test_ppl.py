"""Perplexity by the stride method (offline_quant/ppl.py) and `vllm-gptq ppl`."""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm_gptq_plugin.format import FormatError  # noqa: E402
from vllm_gptq_plugin.offline_quant.ppl import perplexity, windows  # noqa: E402


@pytest.mark.parametrize("n_tokens, ctx, stride", [
    (100, 16, 16), (100, 16, 5), (100, 16, 1), (17, 16, 8), (16, 16, 4), (5, 16, 16), (64, 16, 15),
])
def test_windows_score_each_token_once(n_tokens, ctx, stride):
    targets = []
    for begin, end, first_target in windows(n_tokens, ctx, stride):
        assert 0 <= begin < first_target < end <= n_tokens and end - begin <= ctx
        new = range(first_target, end)
        targets += new
        # every scored token sees the whole window before it: at least ctx - stride tokens of context
        assert all(t - begin >= min(t, ctx - stride) for t in new)
    assert len(targets) == len(set(targets))
    if stride < ctx:
        assert targets == list(range(1, n_tokens))
    else:  # disjoint windows: a window's first token has no context and is not scored
        assert targets == [t for t in range(1, n_tokens) if t % ctx]


class NextIdModel(torch.nn.Module):
    """Fake LM over ids = positions: it gives the true next id t the probability p(t) = PROB[t % 7],
    so the exact perplexity of any scoring is known. It records the windows it reads."""
    PROB = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.05, 0.3, 0.6])

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids):
        ids = input_ids[0]
        self.calls.append((int(ids[0]), len(ids)))
        nxt = ids + 1
        p = self.PROB[nxt % 7]
        probs = ((1 - p) / (self.vocab - 1))[:, None].repeat(1, self.vocab)
        probs[torch.arange(len(ids)), nxt] = p
        return type("Out", (), {"logits": probs.log()[None]})


class NextIdModelKeep(NextIdModel):
    """The same, with the transformers `logits_to_keep` argument (only the last positions' logits)."""

    def forward(self, input_ids, logits_to_keep=0):
        out = super().forward(input_ids)
        out.logits = out.logits[:, -logits_to_keep:]
        return out


@pytest.mark.parametrize("cls", [NextIdModel, NextIdModelKeep])
@pytest.mark.parametrize("ctx, stride", [(16, 16), (16, 4), (10, 7)])
def test_perplexity_scores_the_window_targets_with_their_own_logits(cls, ctx, stride):
    n = 90
    model = cls(vocab=n + 1)
    ppl, n_scored = perplexity(model, torch.arange(n), ctx=ctx, stride=stride, progress=False)
    expected_targets = [t for b, e, f in windows(n, ctx, stride) for t in range(f, e)]
    nll = -torch.log(NextIdModel.PROB[torch.tensor(expected_targets) % 7].double())
    assert n_scored == len(expected_targets)
    assert ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert all(length <= ctx for _, length in model.calls)


@pytest.fixture(scope="session")
def tiny_llama():
    from vllm_gptq_plugin.offline_quant.models import DEFAULT_CACHE, tiny_model
    path = tiny_model("llama", DEFAULT_CACHE / "tiny-llama")
    from vllm_gptq_plugin.offline_quant.loader import load_model
    return path, load_model(path, torch.float32)


def _ids(n, seed=0):
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed))


def test_disjoint_windows_equal_the_mean_cross_entropy(tiny_llama):
    _, model = tiny_llama
    ids = _ids(4 * 64)
    ppl, n_scored = perplexity(model, ids, ctx=64, stride=64, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids.view(4, 64)).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids.view(4, 64)[:, 1:].reshape(-1))
    assert n_scored == 4 * 63
    assert ppl == pytest.approx(math.exp(ce.item()), rel=1e-4)


def test_strided_windows_equal_the_labels_recipe(tiny_llama):
    # The transformers documentation's recipe: mask all but the new tokens with -100 and let the
    # model's own loss average them.
    _, model = tiny_llama
    ids, ctx, stride = _ids(150, seed=1), 64, 24
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + ctx, len(ids))
            window = ids[begin:end][None]
            labels = window.clone()
            labels[:, :-(end - prev_end)] = -100
            n_valid = int((labels[:, 1:] != -100).sum())
            nll += model(input_ids=window, labels=labels).loss.item() * n_valid
            count += n_valid
            prev_end = end
            if end == len(ids):
                break
    ppl, n_scored = perplexity(model, ids, ctx=ctx, stride=stride, progress=False)
    assert n_scored == count == len(ids) - 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_max_tokens_truncates_and_accepts_a_batch_row(tiny_llama):
    _, model = tiny_llama
    ids = _ids(200, seed=2)
    assert perplexity(model, ids[None], ctx=32, max_tokens=100, progress=False) == \
        perplexity(model, ids[:100], ctx=32, progress=False)


@pytest.mark.parametrize("n, ctx, stride, match", [(100, 16, 32, "stride <= ctx"), (1, 16, 16, "at least 2")])
def test_bad_arguments(n, ctx, stride, match):
    with pytest.raises(FormatError, match=match):
        perplexity(NextIdModel(vocab=200), torch.arange(n), ctx=ctx, stride=stride, progress=False)


def test_cli_ppl_end_to_end(tiny_llama, tmp_path, capsys):
    import transformers

    from vllm_gptq_plugin.cli import main
    from vllm_gptq_plugin.offline_quant import data
    path, model = tiny_llama
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question:\n" * 40)
    assert main(["ppl", "--model", str(path), "--text", str(text), "--ctx", "32", "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"ppl ([\d.]+) over (\d+) tokens", out)
    assert m, out
    ids = data.encode(transformers.AutoTokenizer.from_pretrained(path), text.read_text(), 200)
    assert len(ids) == 200 and int(m.group(2)) == 200 - math.ceil(200 / 32)
    expected, _ = perplexity(model, ids, ctx=32, stride=32, progress=False)
    assert float(m.group(1)) == pytest.approx(expected, abs=1e-4 + 1e-4 * expected)


def test_cli_ppl_names_a_missing_text(tiny_llama, capsys):
    from vllm_gptq_plugin.cli import main
    path, _ = tiny_llama
    assert main(["ppl", "--model", str(path), "--text", "missing.txt"]) == 2
    assert "missing.txt" in capsys.readouterr().err
