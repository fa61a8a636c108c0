"""The draft model: a smaller model with the target's vocabulary, run k steps ahead to propose tokens.

Its KV cache lives in the target's blocks: one block table serves both models, each with its own cache
tensors (the pool's bytes per block count both), so a sequence's blocks, prefix hits, preemption and the
return of rejected slots need no second block manager. The draft computes only when proposing: a sequence's
first proposal catches its KV up from num_draft_computed (a prefix hit counts as computed; any draft KV that
is stale costs acceptance, never exactness, since the target verifies every token).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

import torch

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.core.request import Sequence
from tokenmill.engine.models.layers import AttentionMetadata
from tokenmill.engine.models.llama import LlamaForCausalLM
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.weights.loader import GGUFWeights, init_dummy_weights, load_model_files
from tokenmill.engine.weights.quantization import pack_linears

# (logits [rows, vocab] of the sequences' next draft, the sequences) -> (a token per row, the distributions
# they were drawn from, [rows, vocab], or None when every row is greedy)
DraftSampler = Callable[[torch.Tensor, list[Sequence]], tuple[list[int], torch.Tensor | None]]


class DraftModel:
    def __init__(self, spec: SpeculativeConfig, config: EngineConfig, target: ModelConfig, max_model_len: int,
                 ops: ModuleType):
        mc, _, weights = load_model_files(spec.model, spec.load_format, load_tokenizer=False)
        if mc.vocab_size != target.vocab_size:
            raise ValueError(f"the draft model {spec.model!r} has a vocabulary of {mc.vocab_size} tokens and the "
                             f"target {target.vocab_size}: a draft must share the target's tokenizer")
        if mc.max_position_embeddings < max_model_len:
            raise ValueError(f"the draft model {spec.model!r} takes {mc.max_position_embeddings} positions, fewer "
                             f"than max_model_len {max_model_len}; lower --max-model-len")
        self.model_config = mc
        if config.quantization == "gguf" and not isinstance(weights, GGUFWeights):
            # gguf keeps a GGUF file's own blocks; a draft from a Hugging Face folder (or dummy) runs unquantized.
            config = dataclasses.replace(config, quantization=None, speculative_config=None)
        self.device, self.dtype = config.torch_device(), config.torch_dtype()
        old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = LlamaForCausalLM(mc, ops)
        finally:
            torch.set_default_dtype(old)
        with torch.no_grad():
            if weights is None:
                init_dummy_weights(self.model, config.seed + 1)
            else:
                self.model.load_weights(weights)
            pack_linears(self.model, config, weights)
        self.model.eval()
        self.ops = ops
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = config.block_size

    def bytes_per_block(self, block_size: int) -> int:
        c = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim * elem

    def allocate_kv(self, num_blocks: int) -> None:
        c = self.model_config
        shape = (2, num_blocks, self.block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(c.num_hidden_layers)]

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], sample: DraftSampler) -> None:
        """Fill each sequence's spec_token_ids (and spec_draft_probs) with num_lookahead_tokens drafts: the first
        forward catches its KV up to the last token, each further one runs the draft just made."""
        for seq in seqs:
            seq.spec_token_ids = []
        spans = [(seq, seq.token_ids[seq.num_draft_computed:], seq.num_draft_computed) for seq in seqs]
        probs: dict[int, list[torch.Tensor]] = {id(seq): [] for seq in seqs}
        while spans:
            tokens, q = sample(self._forward(spans), [seq for seq, _, _ in spans])
            for i, (seq, token) in enumerate(zip([s for s, _, _ in spans], tokens, strict=True)):
                seq.spec_token_ids.append(token)
                if q is not None:
                    probs[id(seq)].append(q[i])
            spans = [(seq, [seq.spec_token_ids[-1]], seq.num_tokens + len(seq.spec_token_ids) - 1)
                     for seq, _, _ in spans if len(seq.spec_token_ids) < seq.num_lookahead_tokens]
        for seq in seqs:
            # The KV of every input so far: the sequence's tokens and all drafts but the last.
            seq.num_draft_computed = seq.num_tokens + len(seq.spec_token_ids) - 1
            seq.spec_draft_probs = torch.stack(probs[id(seq)]) if probs[id(seq)] else None

    def _forward(self, spans: list[tuple[Sequence, list[int], int]]) -> torch.Tensor:
        """Logits of the last position of each span (sequence, its input tokens, the first one's position)."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        for seq, tokens, start in spans:
            end = start + len(tokens)
            ids += tokens
            positions += range(start, end)
            slots += [seq.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            starts.append(starts[-1] + len(tokens))
        width = max(len(seq.block_ids) for seq, _, _ in spans)
        tables = torch.tensor([seq.block_ids + [0] * (width - len(seq.block_ids)) for seq, _, _ in spans],
                              dtype=torch.int32, device=dev)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        query_start_loc = torch.tensor(starts, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=dev), tables, lens, query_start_loc,
                                 self.ops.plan_attention(tables, lens, query_start_loc, bs))
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev), self.kv_caches, meta)
        return self.model.compute_logits(hidden[query_start_loc[1:].long() - 1]).float()
