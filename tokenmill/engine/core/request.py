"""A sequence's state as the scheduler and engine see it."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from tokenmill.engine.outputs import PromptLogprobs
from tokenmill.engine.sampling.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.sampling.detokenizer import IncrementalDetokenizer
    from tokenmill.engine.sampling.sampler import PenaltyState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One generated sequence: prompt ids, output ids, and how far the KV cache has been computed.

    A request with n > 1 is fanned out into n Sequences that share its prompt (and, through prefix
    caching, its prompt's KV blocks). `block_ids` is the sequence's block table.
    """

    def __init__(self, seq_id: str, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, detokenizer: IncrementalDetokenizer | None,
                 generator: torch.Generator | None, arrival_time: float, lora_id: int = 0):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.token_ids = list(prompt_token_ids)  # prompt + output, grows every step
        self.params = params
        self.detokenizer = detokenizer
        self.generator = generator
        self.arrival_time = arrival_time
        self.lora_id = lora_id  # the LoRA adapter it runs (engine/weights/lora.py); 0: the base model
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # chained sha256 digests of this sequence's full blocks
        self.num_registered_blocks = 0  # leading blocks already in the prefix cache
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # The request's prompt logprobs, kept by its first sample: one entry per prompt token scored so far
        # (the first token's is None). None when not asked, and again once handed out in a delta.
        self.prompt_logprobs: PromptLogprobs | None = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.matcher = None  # structured outputs: the grammar state of this sequence's output
        self.num_sent_tokens = 0  # output tokens already handed out in a delta
        self.finish_sent = False  # the delta carrying finish_reason has gone out
        self.penalty_state: PenaltyState | None = None  # made on first use by a penalty
        # Speculative decoding (engine/spec_decode): the draft tokens this step verifies after the sequence's
        # last token, and the distributions a draft model drew them from ([k, vocab]; None: certain guesses).
        self.spec_token_ids: list[int] = []
        self.spec_draft_probs: torch.Tensor | None = None
        self.num_lookahead_tokens = 0  # slots asked for (before scheduling) and granted (after) for drafts
        self.num_draft_computed = 0  # leading tokens whose KV the draft model holds (in the same blocks)
        self.spec_state = None  # the proposer's own per-sequence state (an n-gram index, acceptance history)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def reads_prefix_cache(self) -> bool:
        """Prompt logprobs need the logits of every prompt token, so a request that asks computes its whole
        prompt, as vLLM does; every sample does, so that the first (which scores it) finishes its prompt
        no later than the others and the logprobs come with the request's first delta."""
        return self.params.prompt_logprobs is None or bool(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
