"""Prompt logprobs (vLLM's prompt_logprobs): for a prompt token, its logprob given the tokens before it,
its rank, and the top-N alternatives, all of the raw logits (log_softmax in float32, as the sampler
reports). The model runner asks for them only on the prompt positions of requests that want them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from tokenmill.engine.outputs import Logprob


def compute_prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                            targets: list[int], num_top: list[int], max_rows: int) -> list[dict[int, Logprob]]:
    """One entry per row of `hidden` (the hidden state before targets[i]): {target: its Logprob, and the
    num_top[i] most likely tokens}. The LM head runs on at most max_rows rows at a time, so a long prefill
    chunk never holds [chunk, vocab] logits at once; the results cross to the host in one transfer."""
    n_top = max(num_top)
    packed = []
    for lo in range(0, len(targets), max_rows):
        logprobs = torch.log_softmax(compute_logits(hidden[lo:lo + max_rows]).float(), dim=-1)
        target = torch.tensor(targets[lo:lo + max_rows], dtype=torch.long, device=logprobs.device)[:, None]
        chosen = logprobs.gather(1, target)
        rank = (logprobs >= chosen).sum(dim=-1, keepdim=True)  # vLLM's rank: ties count as ahead
        columns = [chosen.double(), rank.double()]
        if n_top:
            top = logprobs.topk(n_top, dim=-1)
            columns += [top.indices.double(), top.values.double()]
        packed.append(torch.cat(columns, dim=1))
    rows = torch.cat(packed).tolist()  # float64 holds token ids and ranks exactly
    result = []
    for target, n, row in zip(targets, num_top, rows, strict=True):
        entry = {target: Logprob(row[0], int(row[1]))}
        for i in range(n):
            entry.setdefault(int(row[2 + i]), Logprob(row[2 + n_top + i], i + 1))
        result.append(entry)
    return result
