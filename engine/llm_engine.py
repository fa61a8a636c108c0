"""LLMEngine: the step loop. add_request, abort_request, step, has_unfinished_requests.

One step = schedule -> one forward pass -> sample -> append tokens, detokenize, check stops, free
blocks. The server's async engine wraps this class without reaching into its parts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .loader import load_model_files
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .request import Sequence
from .sampler import Sampler, SamplingMetadata
from .sampling_params import SamplingParams
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class InvalidRequestError(ValueError):
    """A request the engine cannot serve; `param` names the SamplingParams field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class EngineStats:
    """A snapshot for logs and the server's /metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    finished_reasons: dict[str, int] = field(default_factory=dict)


class LLMEngine:
    """Holds the tokenizer, model runner, scheduler and sampler; advances all requests one step at a time."""

    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        model_path = config.resolved_model()
        self.model_config, self.tokenizer, weights = load_model_files(model_path, config.load_format)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.runner = ModelRunner(config, mc, weights, self.max_model_len)
        # A sequence must fit the pool by itself, or preemption could not make room for it.
        self.max_model_len = min(self.max_model_len, self.runner.num_blocks * config.block_size)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler()
        self.eos_token_ids = set(mc.eos_token_id)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, _Request] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.finished_reasons: dict[str, int] = {}
        logger.info("engine ready: %s, %s on %s, %d KV blocks of %d tokens, max_model_len %d",
                    mc.name, self.runner.dtype, self.runner.device, self.runner.num_blocks,
                    config.block_size, self.max_model_len)

    # ---- requests --------------------------------------------------------------------------

    def get_tokenizer(self):
        return self.tokenizer

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids) from a string, a list of ids, or a vLLM-style dict."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        return None, list(prompt)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError (before taking any memory) if it cannot be served."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        text, ids = self.tokenize(prompt)
        self._validate(ids, params)
        if params.max_tokens is None:
            params = params.clone(max_tokens=self.max_model_len - len(ids))
        params.all_stop_token_ids = set() if params.ignore_eos else set(self.eos_token_ids)
        now = time.time()
        seqs = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:  # each sample of a seeded request gets its own stream
                generator = torch.Generator(self.runner.device).manual_seed(params.seed + i)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params) if self.tokenizer else None
            seq = Sequence(f"{request_id}#{i}", request_id, i, ids, params, detok, generator,
                           arrival_time or now)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, text, ids, seqs, RequestMetrics(arrival_time or now))
        self.num_prompt_tokens += len(ids)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        max_tokens = params.max_tokens or 1
        if len(ids) + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens and max_tokens is {max_tokens}, together "
                f"{len(ids) + max_tokens}, but the model's context is {self.max_model_len} tokens")
        for name in ("logit_bias", "stop_token_ids"):
            bad = [t for t in getattr(params, name) or () if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                          name)

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop requests now and return their KV blocks; unknown or finished ids are ignored."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    self._finish(seq, "abort", None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward pass; return the new state of every request that advanced."""
        sched = self.scheduler.schedule()
        if sched.is_empty():
            return []
        now = time.time()
        for seq in sched.seqs:
            m = self.requests[seq.request_id].metrics
            m.first_scheduled_time = m.first_scheduled_time or now
        logits, sample_seqs = self.runner.execute(sched)
        for seq, n in zip(sched.seqs, sched.num_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
        if not sample_seqs:
            return []
        meta = SamplingMetadata.build(
            [s.params for s in sample_seqs], [s.prompt_token_ids for s in sample_seqs],
            [s.output_token_ids for s in sample_seqs], [s.generator for s in sample_seqs],
            self.model_config.vocab_size, logits.device)
        out = self.sampler(logits, meta)
        now = time.time()
        touched: dict[str, _Request] = {}
        for i, seq in enumerate(sample_seqs):
            self._append(seq, out.token_ids[i], out.logprobs[i], out.top_logprobs[i])
            req = self.requests[seq.request_id]
            req.metrics.first_token_time = req.metrics.first_token_time or now
            touched[seq.request_id] = req
        self.num_generation_tokens += len(sample_seqs)
        results = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = now
                del self.requests[req.request_id]
            results.append(self._output(req))
        return results

    def _append(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        seq.append_token(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            entry = dict(top or [])
            entry[token] = logprob
            seq.logprobs.append(entry)
        params = seq.params
        num_out = len(seq.output_token_ids)
        stop_token = num_out >= params.min_tokens and (
            token in params.all_stop_token_ids or token in params.stop_token_ids)
        if stop_token:
            reason = None if token in params.all_stop_token_ids else token
            if params.include_stop_str_in_output and seq.detokenizer:
                seq.detokenizer.append([token])
            self._finish(seq, "stop", reason)
            return
        stop_str = seq.detokenizer.append([token]) if seq.detokenizer else None
        if stop_str is not None and num_out >= params.min_tokens:
            self._finish(seq, "stop", stop_str)
        elif num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        if seq.detokenizer and not isinstance(stop_reason, str):
            # Releasing held-back bytes can complete a stop string after all.
            late_stop = seq.detokenizer.finish()
            if late_stop is not None and reason != "abort":
                reason, stop_reason = "stop", late_stop
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        self.finished_reasons[reason] = self.finished_reasons.get(reason, 0) + 1

    def _output(self, req: _Request) -> RequestOutput:
        outs = [CompletionOutput(
            index=s.index, text=s.detokenizer.output_text if s.detokenizer else "",
            token_ids=list(s.output_token_ids),
            cumulative_logprob=s.cumulative_logprob if s.params.logprobs is not None else None,
            logprobs=list(s.logprobs) if s.logprobs is not None else None,
            finish_reason=s.finish_reason, stop_reason=s.stop_reason) for s in req.seqs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             req.metrics, num_cached_tokens=req.seqs[0].num_cached_tokens)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(), num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            prompt_tokens=self.num_prompt_tokens, generation_tokens=self.num_generation_tokens,
            finished_reasons=dict(self.finished_reasons))
