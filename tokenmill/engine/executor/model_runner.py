"""The model and its KV cache on a device; turns a SchedulerOutput into packed tensors and logits.

This is the one place where bookkeeping becomes tensors: input_ids, positions, slot_mapping,
block_tables, seq_lens, query_start_loc, and the indices of the tokens whose logits are sampled (and, for
requests that ask for prompt logprobs, of their prompt tokens). Under tensor parallelism the engine's
runner is rank 0: it builds each step's StepInputs and hands them to the other ranks' runners
(engine/executor/distributed.py), and every rank runs the same forward on its shard.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.core.request import Sequence
from tokenmill.engine.core.scheduler import SchedulerOutput
from tokenmill.engine.executor.cuda_graph import DecodeGraphs
from tokenmill.engine.executor.shm_collectives import ShmCollectives, supported_shm_device
from tokenmill.engine.models.layers import AttentionMetadata, TensorParallel, kernel_ops
from tokenmill.engine.models.llama import LlamaForCausalLM
from tokenmill.engine.outputs import Logprob
from tokenmill.engine.sampling.prompt_logprobs import compute_prompt_logprobs
from tokenmill.engine.spec_decode.draft_model import DraftModel
from tokenmill.engine.weights.loader import init_dummy_weights
from tokenmill.engine.weights.lora import LoRASlots
from tokenmill.engine.weights.quantization import pack_linears
from tokenmill.kernels.reference import LoRAPlan

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class ModelRunnerOutput:
    """One step's results: float32 logits of the sequences that sample (those whose scheduled tokens reach
    their last token: a row for the last token, then one per draft token it verifies), those sequences, and
    the prompt logprobs scored this step, per sequence."""

    logits: torch.Tensor | None = None
    sample_seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[tuple[Sequence, list[dict[int, Logprob]]]] = field(default_factory=list)


@dataclass
class StepInputs:
    """One step's packed inputs, on the host: all a rank needs to run the step's forward and LM head."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    logits_indices: torch.Tensor  # rows whose logits are sampled
    prompt_rows: torch.Tensor  # rows whose logits score the prompt token after them
    prompt_targets: list[int]  # those prompt tokens
    prompt_num_top: list[int]  # how many alternatives each prompt row reports
    lora_plan: LoRAPlan | None = None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class WorkerGroup(Protocol):
    """The other ranks as rank 0 drives them (executor.distributed.Workers); a protocol, so this module
    needs no import of the module that starts the workers (and imports this one to run them)."""

    def send(self, inputs: StepInputs) -> None: ...

    def raise_if_dead(self, cause: BaseException | None = None) -> None: ...

    def shutdown(self) -> None: ...


class ModelRunner:
    """The model (this rank's shard of it) and its KV cache. Rank 0's runner is given the other ranks'
    Workers, and sends them each step's inputs; the others' run what they receive (run())."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights, max_model_len: int,
                 rank: int = 0, workers: WorkerGroup | None = None):
        self.config = config
        self.model_config = model_config
        self.workers = workers
        self.tp_broken: str | None = None  # why a tensor-parallel step ended early, leaving the ranks out of step
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.tp = TensorParallel(rank, config.tensor_parallel_size, self._shm_collectives(model_config, workers))
        if self.device.type == "cuda" and self.tp.world_size > 1:
            self.device = torch.device("cuda", rank)
            torch.cuda.set_device(self.device)
        self.block_size = config.block_size
        self.ops = kernel_ops(self.device, config.cpu_kernels)
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = LlamaForCausalLM(model_config, self.ops, self.tp)
        if weights is None:
            init_dummy_weights(self.model, config.seed)
        else:
            with torch.no_grad():
                self.model.load_weights(weights)
        with torch.no_grad():
            pack_linears(self.model, config, weights)
        self.loras: LoRASlots | None = None  # LoRA on top of whatever pack_linears made of the linears
        if config.enable_lora:
            with torch.device(self.device), _default_dtype(self.dtype):
                self.loras = LoRASlots(self.model, model_config, config, self.ops)
        self.model.eval()
        self.num_kv_heads = len(self.model.heads.kv_heads)  # this rank's: its pool holds only those
        spec = config.speculative_config
        self.draft: DraftModel | None = None  # its KV cache shares the target's blocks (and the pool's budget)
        if spec is not None and spec.method == "draft_model":
            self.draft = DraftModel(spec, config, model_config, max_model_len, self.ops)
        self.num_blocks = self._num_kv_blocks(max_model_len)
        if self.draft is not None:
            self.draft.allocate_kv(self.num_blocks)
        c = model_config
        shape = (2, self.num_blocks, self.block_size, self.num_kv_heads, c.head_dim)
        # Zeroed, not empty: attention reads whole blocks, and 0 * NaN from stale memory would be NaN.
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(c.num_hidden_layers)]
        if self.device.type == "cuda":
            # Every attention variant compiled now (or loaded from Triton's cache), not mid-serve.
            self.ops.launch_every_variant(len(self.model.heads.q_heads), self.kv_caches[0][0], self.kv_caches[0][1],
                                          c.head_dim ** -0.5)
            if self.loras is not None:
                self.loras.warm_up(self.device)
        self.decode_graphs = None
        # Tensor-parallel steps run eagerly: a graph would have to capture the NCCL collectives too.
        if self.device.type == "cuda" and not config.enforce_eager and self.tp.world_size == 1:
            self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, config.max_num_seqs,
                                              -(-max_model_len // self.block_size), self.device)

    def _shm_collectives(self, model_config: ModelConfig, workers: WorkerGroup | None) -> ShmCollectives | None:
        """CPU ranks' collectives through shared memory (collective: every rank's runner calls it), with
        slots for a step's hidden states; None where torch.distributed's own serve."""
        if self.config.tensor_parallel_size == 1 or not supported_shm_device(self.device):
            return None
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return ShmCollectives(self.config.max_num_batched_tokens * model_config.hidden_size * elem,
                              workers.raise_if_dead if workers is not None else None)

    def _bytes_per_block(self) -> int:
        c = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        draft = self.draft.bytes_per_block(self.block_size) if self.draft is not None else 0
        return 2 * c.num_hidden_layers * self.block_size * self.num_kv_heads * c.head_dim * elem + draft

    def _num_kv_blocks(self, max_model_len: int) -> int:
        budget = self.config.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            budget = self._profile_free_gpu_memory()
        elif budget is None:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        num_blocks = budget // self._bytes_per_block()
        if self.tp.world_size > 1:
            # One block table serves every rank: the rank with the most KV heads per block sets the count.
            count = torch.tensor([num_blocks], device=self.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
            num_blocks = int(count.item())
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no KV block "
                             f"(one block takes {self._bytes_per_block()} bytes)")
        return int(num_blocks)

    def _profile_free_gpu_memory(self) -> int:
        """GPU memory left for the KV cache: gpu_memory_utilization of the device, less what is in use now
        (weights, the CUDA context and other processes: mem_get_info sees them all), less the activation
        peak of a max_num_batched_tokens prefill with the LM head on max_num_seqs rows, less the decode
        graphs' private pool (about one max_num_seqs-token forward: the graphs share it, largest first)."""
        c, cfg = self.model_config, self.config
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        prefill = self._forward_peak(min(cfg.max_num_batched_tokens, c.max_position_embeddings),
                                     logits_rows=cfg.max_num_seqs)
        graphs = 0
        if not cfg.enforce_eager and self.tp.world_size == 1:
            graphs = self._forward_peak(min(cfg.max_num_seqs, c.max_position_embeddings))
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total * cfg.gpu_memory_utilization - (total - free) - prefill - graphs)

    def _forward_peak(self, n: int, logits_rows: int = 0) -> int:
        """Bytes a forward pass of one n-token prompt allocates at its peak beyond what is allocated now,
        less its scratch KV blocks (serving keeps those tokens in the real cache, which the budget is for);
        the memory goes back to the driver afterwards."""
        c, dev = self.model_config, self.device
        num_blocks = -(-n // self.block_size)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        scratch = [torch.empty((2, num_blocks, self.block_size, self.num_kv_heads, c.head_dim),
                               dtype=self.dtype, device=dev) for _ in range(c.num_hidden_layers)]
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, dtype=torch.int64, device=dev),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev)[None],
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev))
        with torch.inference_mode():
            positions = torch.arange(n, device=dev)
            h = self.model(positions % c.vocab_size, positions, scratch, meta)
            if logits_rows:
                self.model.compute_logits(h[-logits_rows:])
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base - sum(t.numel() * t.element_size() for t in scratch)
        del scratch, h
        torch.cuda.empty_cache()
        return peak

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One forward pass, on every rank; see ModelRunnerOutput."""
        inputs, sample_seqs, prompt_spans = self._prepare(sched)
        if self.workers is None:
            logits, entries = self.run(inputs)
        else:
            if self.tp_broken is not None:
                raise RuntimeError(f"a tensor-parallel step ended early ({self.tp_broken}); the ranks are out "
                                   "of step: restart the engine")
            self.workers.send(inputs)
            try:
                logits, entries = self.run(inputs)
            except BaseException as e:  # the other ranks may be mid-step: no step can follow this one
                self.tp_broken = repr(e)
                if isinstance(e, RuntimeError):  # a collective failed: say which rank is gone, if one is
                    self.workers.raise_if_dead(e)
                raise
        out = ModelRunnerOutput(logits, sample_seqs)
        i = 0
        for seq, k in prompt_spans:
            out.prompt_logprobs.append((seq, entries[i:i + k]))
            i += k
        return out

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()

    def _prepare(self, sched: SchedulerOutput) -> tuple[StepInputs, list[Sequence], list[tuple[Sequence, int]]]:
        """The step's inputs, the sequences that sample, and (sequence, rows) of the prompt logprobs scored."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        logits_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_spans: list[tuple[Sequence, int]] = []
        bs = self.block_size
        num_tokens = []  # per sequence, its draft tokens included
        for seq, n in zip(sched.seqs, sched.num_tokens, strict=False):
            start = seq.num_computed_tokens
            end = start + n
            drafts = seq.spec_token_ids  # verified after the last token: a query of 1 + k tokens
            input_ids += seq.token_ids[start:end] + drafts
            positions += range(start, end + len(drafts))
            blocks = seq.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end + len(drafts))]
            seq_lens.append(end + len(drafts))
            num_tokens.append(n + len(drafts))
            if seq.prompt_logprobs is not None:
                # Position p scores prompt token p + 1. Those scored before a preemption are not scored again.
                first, last = max(start, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    prompt_rows += range(query_start_loc[-1] + first - start, query_start_loc[-1] + last - start)
                    prompt_targets += seq.token_ids[first + 1:last + 1]
                    prompt_spans.append((seq, last - first))
            query_start_loc.append(query_start_loc[-1] + n + len(drafts))
            if end == seq.num_tokens:  # the last token's row, then one per draft token
                logits_indices += range(query_start_loc[-1] - 1 - len(drafts), query_start_loc[-1])
                sample_seqs.append(seq)
        max_blocks = max(len(s.block_ids) for s in sched.seqs)
        block_tables = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in sched.seqs]
        # Built on the host: a graph replay copies them straight into its static buffers. On a GPU, in
        # pinned memory, so that every host-to-device copy of the step is asynchronous.
        pin = self.device.type == "cuda"
        inputs = StepInputs(
            _host_tensor(input_ids, torch.long, pin), _host_tensor(positions, torch.long, pin),
            _host_tensor(slots, torch.int64, pin), _host_tensor(block_tables, torch.int32, pin),
            _host_tensor(seq_lens, torch.int32, pin), _host_tensor(query_start_loc, torch.int32, pin),
            _host_tensor(logits_indices, torch.long, pin), _host_tensor(prompt_rows, torch.long, pin),
            prompt_targets, [seq.params.prompt_logprobs for seq, k in prompt_spans for _ in range(k)],
            self.loras.plan(sched.seqs, num_tokens, self.device) if self.loras else None)
        return inputs, sample_seqs, prompt_spans

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> tuple[torch.Tensor | None, list[dict[int, Logprob]]]:
        """The forward pass and LM head of one step: (float32 logits of the sampled rows or None, the
        prompt logprobs of the prompt rows)."""
        graphs = self.decode_graphs
        # The graphs were captured without adapters: a step that runs one goes eagerly.
        batch = len(inputs.seq_lens)
        one_each = len(inputs.logits_indices) == len(inputs.input_ids) == batch  # not a verify of drafts
        if graphs is not None and inputs.lora_plan is None and one_each and batch <= graphs.max_batch_size:
            # Every sequence runs one token and samples it: a decode step (so no prompt row), replayed from a graph.
            hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.block_tables,
                                inputs.seq_lens)
            return self.model.compute_logits(hidden).float(), []
        dev = self.device
        ids, pos, slot_mapping, tables, lens, starts = (
            t.to(dev, non_blocking=True) for t in (inputs.input_ids, inputs.positions, inputs.slot_mapping,
                                                   inputs.block_tables, inputs.seq_lens, inputs.query_start_loc))
        # Once per step, not per layer: whatever host-side layout the attention op wants.
        plan = self.ops.plan_attention(tables, lens, starts, self.block_size)
        meta = AttentionMetadata(slot_mapping, tables, lens, starts, plan)
        hidden = self._forward(ids, pos, meta, inputs.lora_plan)
        entries: list[dict[int, Logprob]] = []
        if inputs.prompt_targets:
            rows = hidden[inputs.prompt_rows.to(dev, non_blocking=True)]
            # In slices of max_num_seqs rows: the LM-head size the memory profile reserves.
            entries = compute_prompt_logprobs(self.model.compute_logits, rows, inputs.prompt_targets,
                                              inputs.prompt_num_top, self.config.max_num_seqs)
        logits = None
        if len(inputs.logits_indices):
            # Only the sampled positions need the LM head: a sixth of the work on prompt-heavy loads.
            hidden = hidden[inputs.logits_indices.to(dev, non_blocking=True)]
            logits = self.model.compute_logits(hidden).float()
        return logits, entries

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata,
                 lora_plan: LoRAPlan | None) -> torch.Tensor:
        if self.loras is None:
            return self.model(ids, pos, self.kv_caches, meta)
        self.loras.context.plan = lora_plan
        try:
            return self.model(ids, pos, self.kv_caches, meta)
        finally:
            self.loras.context.plan = None  # the graphs' replays and the memory profile run no adapter


def _host_tensor(values: list, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A CPU tensor of `values`, page-locked when `pin` (torch's caching host allocator reuses the pages,
    and a non_blocking copy from them does not wait for the device)."""
    return torch.tensor(values, dtype=dtype, pin_memory=pin)
