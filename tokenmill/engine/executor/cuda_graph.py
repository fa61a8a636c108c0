"""Decode steps replayed from CUDA graphs.

At small decode batches a step is dominated by Python and kernel-launch overhead, not by the GPU: a
graph replays the whole forward pass (every layer's launches) as one. Graphs are captured once, for a
ladder of batch sizes, over static input buffers; a step of B decodes copies its inputs into the
buffers and replays the graph of the next size up. The padding rows write no KV (slot -1) and attend
to one key, so they cost little and touch nothing real. The graphs end at the hidden states: the LM head
runs after the replay on the real rows only, so no graph holds a vocab-sized logits buffer (a few hundred
MB over the ladder of sizes for a 128k vocabulary), as nano-vllm does.
"""
from __future__ import annotations

import bisect
import logging

import torch

from tokenmill.engine.models.layers import AttentionMetadata
from tokenmill.engine.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Static buffers and one captured forward pass (input ids to final hidden states) per batch size.

    With capture=False nothing is captured and `run` executes the same padded forward eagerly: the
    CPU tests use that to check the padding and buffer handling that the graphs replay.
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], max_num_seqs: int,
                 max_blocks_per_seq: int, device: torch.device, capture: bool = True):
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        n = self.batch_sizes[-1]
        with torch.device(device):
            self.input_ids = torch.zeros(n, dtype=torch.long)
            self.positions = torch.zeros(n, dtype=torch.long)
            self.slot_mapping = torch.full((n,), -1, dtype=torch.int64)
            self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32)
            self.seq_lens = torch.ones(n, dtype=torch.int32)
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)  # one query per sequence
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    @torch.inference_mode()
    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.seq_lens[:bs],
                                 self.query_start_loc[:bs + 1])
        return self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta)

    def _capture_all(self) -> None:
        # Largest first, so the smaller graphs reuse its memory pool.
        pool = None
        for bs in reversed(self.batch_sizes):
            self._forward(bs)  # warm-up outside the capture: Triton compiles its kernels here
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, hidden] of a step of B single-token sequences (B <= max_batch_size).

        The result is a view of the graph's output buffer: valid until the next call."""
        b, width = block_tables.shape
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, b)]
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(slot_mapping, non_blocking=True)
        self.block_tables[:b, :width].copy_(block_tables, non_blocking=True)
        self.seq_lens[:b].copy_(seq_lens, non_blocking=True)
        # Padding rows: write nothing and attend to one key (block table entries past a sequence's
        # length are never read, so stale ones are harmless).
        self.slot_mapping[b:bs].fill_(-1)
        self.seq_lens[b:bs].fill_(1)
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.hidden[bs][:b]
        return self._forward(bs)[:b]
