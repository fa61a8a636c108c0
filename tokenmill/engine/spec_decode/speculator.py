"""Speculative decoding as a variant of the engine's step, not a second engine.

Before scheduling, plan() asks draft slots (num_lookahead_tokens) for the running decodes worth proposing
for; the scheduler grants what its token budget and the block pool spare; propose() makes that many drafts
(the n-gram index, or the draft model); the model runner verifies every sequence's drafts in the one
forward of the step, as a query of 1 + k tokens; the sampler draws a token for each of those rows (greedy:
the argmax; random: rejection sampling, so the output keeps the target's distribution); and verified()
keeps the drafts the target's own tokens confirm, plus the target's token after them. Greedy output is
token for token what decoding without speculation gives.

Proposals pause where they would not pay: for a whole step while the running batch is larger than
disable_by_batch_size (a large batch already uses the compute a verify would take), and for a sequence whose
drafts have lately been accepted at less than min_acceptance_rate; in between, a sequence proposes fewer
tokens the fewer of its recent drafts were accepted. Sequences with a grammar (structured
outputs) or with repetition, frequency or presence penalties get no proposals: their next row depends on
state kept per sampled token.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from tokenmill.engine.core.request import Sequence
from tokenmill.engine.core.scheduler import SchedulerOutput
from tokenmill.engine.sampling.sampler import SamplingMetadata, propose_tokens
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.spec_decode.draft_model import DraftModel
from tokenmill.engine.spec_decode.ngram import NgramIndex

ACCEPTANCE_DECAY = 0.8  # weight of the history in a sequence's moving acceptance rate
INITIAL_ACCEPTANCE = 0.5
# What one more draft token adds to a verify step's time, as a share of a decode step: the j-th draft is
# worth its slot while the chance of reaching and accepting it (about rate ** j) is above this.
DRAFT_TOKEN_COST = 0.1


@dataclass
class SpecDecodeStats:
    """Counters for /metrics, as vLLM names them: proposals made (a sequence's drafts in one step), draft
    tokens, accepted draft tokens, and accepted tokens by draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()

    @classmethod
    def total(cls, stats: list[SpecDecodeStats]) -> SpecDecodeStats | None:
        """Several engines' counters summed (replicas of one model); None when none speculates."""
        if not stats:
            return None
        per_pos = [sum(counts) for counts in itertools.zip_longest(*(s.accepted_per_pos for s in stats), fillvalue=0)]
        return cls(sum(s.num_drafts for s in stats), sum(s.num_draft_tokens for s in stats),
                   sum(s.num_accepted_tokens for s in stats), tuple(per_pos))


class _SeqState:
    def __init__(self, spec: SpeculativeConfig):
        self.index = NgramIndex(spec.prompt_lookup_min, spec.prompt_lookup_max) if spec.method == "ngram" else None
        self.acceptance = INITIAL_ACCEPTANCE
        self.paused_until = 0


class Speculator:
    def __init__(self, spec: SpeculativeConfig, max_model_len: int, vocab_size: int, device: torch.device,
                 draft: DraftModel | None = None):
        self.spec = spec
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.device = device
        self.draft = draft
        self.num_steps = 0
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.accepted_per_pos = [0] * spec.num_speculative_tokens

    def stats(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               tuple(self.accepted_per_pos))

    def plan(self, running: list[Sequence]) -> None:
        """Before scheduling: the draft slots each running sequence asks for (n-gram drafts are found here)."""
        self.num_steps += 1
        on = len(running) <= self.spec.disable_by_batch_size
        for seq in running:
            seq.spec_token_ids, seq.spec_draft_probs = [], None
            seq.num_lookahead_tokens = self._wanted(seq) if on else 0

    def _wanted(self, seq: Sequence) -> int:
        p = seq.params
        if (seq.num_tokens - seq.num_computed_tokens != 1 or seq.matcher is not None
                or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty):
            return 0
        # Drafts past max_tokens or the context would only be thrown away.
        k = min(self.spec.num_speculative_tokens, p.max_tokens - len(seq.output_token_ids) - 1,
                self.max_model_len - seq.num_tokens)
        if k <= 0:
            return 0
        if seq.spec_state is None:
            seq.spec_state = _SeqState(self.spec)
        state: _SeqState = seq.spec_state
        if state.paused_until > self.num_steps:
            return 0
        if state.acceptance < 1:
            k = max(1, min(k, int(math.log(DRAFT_TOKEN_COST) / math.log(max(state.acceptance, 1e-3)))))
        if state.index is not None:
            seq.spec_token_ids = state.index.propose(seq.token_ids, k)
            return len(seq.spec_token_ids)
        return k

    def propose(self, sched: SchedulerOutput) -> None:
        """After scheduling: drafts of the granted lengths for the scheduled sequences; none for the rest."""
        granted = []
        for seq in sched.seqs:
            if seq.num_lookahead_tokens:
                granted.append(seq)
            else:
                seq.spec_token_ids, seq.spec_draft_probs = [], None
        if self.draft is None:
            for seq in granted:
                del seq.spec_token_ids[seq.num_lookahead_tokens:]
        elif granted:
            self.draft.propose(granted, self._sample_drafts)

    def _sample_drafts(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor | None]:
        meta = SamplingMetadata.build(
            [s.params for s in seqs], [s.prompt_token_ids for s in seqs],
            [s.output_token_ids + s.spec_token_ids for s in seqs], [s.generator for s in seqs],
            self.vocab_size, self.device)
        return propose_tokens(logits, meta)

    def verified(self, seq: Sequence, tokens: list[int]) -> int:
        """How many of seq's drafts the target's tokens (one per verified row) confirm. The KV of those
        drafts is kept (num_computed_tokens counts them); the caller appends them and the token after."""
        drafts = seq.spec_token_ids
        accepted = 0
        while accepted < len(drafts) and tokens[accepted] == drafts[accepted]:
            accepted += 1
        if drafts:
            self.num_drafts += 1
            self.num_draft_tokens += len(drafts)
            self.num_accepted_tokens += accepted
            for i in range(accepted):
                self.accepted_per_pos[i] += 1
            state: _SeqState = seq.spec_state
            state.acceptance = ACCEPTANCE_DECAY * state.acceptance + (1 - ACCEPTANCE_DECAY) * accepted / len(drafts)
            if state.acceptance < self.spec.min_acceptance_rate:
                state.paused_until = self.num_steps + self.spec.pause_steps
                state.acceptance = INITIAL_ACCEPTANCE  # a fresh start once the pause is over
        seq.num_computed_tokens += accepted
        seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
        return accepted
