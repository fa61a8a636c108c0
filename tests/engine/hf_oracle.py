"""The transformers oracle shared by the model tests: greedy tokens and logprobs of one prompt."""
from __future__ import annotations

import pytest
import torch


def assert_matches_transformers(hf, prompt_ids: list[int], got, num_tokens: int, top_n: int = 0) -> None:
    """got (a CompletionOutput of a greedy run with logprobs) holds transformers' greedy tokens, the
    chosen tokens' logprobs and (top_n > 0) the top_n alternatives' logprobs, within 1e-4."""
    ids = torch.tensor([prompt_ids])
    ref = hf.generate(ids, max_new_tokens=num_tokens, do_sample=False, min_new_tokens=num_tokens, pad_token_id=0)
    ref_tokens = ref[0, ids.shape[1]:].tolist()
    assert got.token_ids == ref_tokens
    with torch.no_grad():
        logp = torch.log_softmax(hf(ref).logits[0, ids.shape[1] - 1:-1].double(), -1)
    for i, (tok, entry) in enumerate(zip(ref_tokens, got.logprobs, strict=True)):
        assert entry[tok] == pytest.approx(logp[i, tok].item(), abs=1e-4)
        if top_n:
            top = logp[i].topk(top_n)
            for t, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
                assert entry[t] == pytest.approx(lp, abs=1e-4)


def assert_prompt_logprobs_match_transformers(hf, prompt_ids: list[int], got, top_n: int) -> None:
    """got (RequestOutput.prompt_logprobs) holds, for every prompt token after the first, transformers'
    logprob of it given the tokens before it (within 1e-4), its rank, and the top_n alternatives."""
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt_ids])).logits[0].double(), -1)
    assert len(got) == len(prompt_ids) and got[0] is None
    for i, (tok, entry) in enumerate(zip(prompt_ids[1:], got[1:], strict=True)):
        ref = logp[i]
        assert entry[tok].logprob == pytest.approx(ref[tok].item(), abs=1e-4)
        # Ties within the tolerance may fall either way.
        assert (ref > ref[tok] + 1e-4).sum() + 1 <= entry[tok].rank <= (ref >= ref[tok] - 1e-4).sum()
        alternatives = sorted((lp for t, lp in entry.items() if lp.rank <= top_n), key=lambda lp: lp.rank)
        assert [lp.rank for lp in alternatives] == list(range(1, top_n + 1))
        assert [lp.logprob for lp in alternatives] == pytest.approx(ref.topk(top_n).values.tolist(), abs=1e-4)


def random_checkpoint(config, path, tokenizer):
    """A transformers model of config with seeded random weights, its biases and norms made non-trivial (they
    start at zero and one), saved with tokenizer to path; returns the model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
