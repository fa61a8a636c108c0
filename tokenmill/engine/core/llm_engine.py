"""LLMEngine: the step loop. add_request, abort_request, step, has_unfinished_requests.

One step = schedule -> one forward pass -> sample -> append tokens, detokenize, check stops, free
blocks. step() returns deltas: each request that advanced, with only what it gained. The server's
async engine and the offline LLM both drive this class through those four calls and nothing else.

One request's failure is its own: whatever can fail for one request (sampling its row, detokenizing,
stop checks, logprobs) runs inside a guard that finishes that request with finish_reason "error" and
an error message; the other requests go on with exactly the tokens they would have had. Anything else
that raises out of step() is a fault of the engine itself.
"""
from __future__ import annotations

import bisect
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.block_manager import BlockManager
from tokenmill.engine.core.request import Sequence
from tokenmill.engine.core.scheduler import Scheduler
from tokenmill.engine.executor.distributed import Workers
from tokenmill.engine.executor.model_runner import ModelRunner
from tokenmill.engine.faults import FaultInjector
from tokenmill.engine.limits import check_prompt, truncate_prompt
from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.engine.sampling.detokenizer import IncrementalDetokenizer
from tokenmill.engine.sampling.sampler import PenaltyState, Sampler, SamplerOutput, SamplingMetadata
from tokenmill.engine.sampling.sampling_params import SamplingParams
from tokenmill.engine.sampling.structured_output import GrammarCompiler, token_bitmask_op
from tokenmill.engine.spec_decode.speculator import SpecDecodeStats, Speculator
from tokenmill.engine.weights.loader import load_model_files
from tokenmill.engine.weights.lora import LoRAInfo, LoRASlots

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics
    fault_text: str = ""  # what fault injection matches against (the prompt's text)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


# Upper bounds of the tokens-per-step histogram's buckets (vLLM's iteration_tokens_total); one more bucket, above
# them all, is +Inf.
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class IterationTokens:
    """Tokens per engine step since start, as vLLM counts them for iteration_tokens_total: the prompt tokens
    of sequences whose prefill ended in the step (they got their first token) plus the tokens generated in
    it. counts: steps per bucket of ITERATION_TOKEN_BUCKETS, not cumulative, the last one above them all;
    tokens: every step's tokens summed."""

    counts: tuple[int, ...] = (0,) * (len(ITERATION_TOKEN_BUCKETS) + 1)
    tokens: int = 0

    @classmethod
    def total(cls, histograms: list[IterationTokens]) -> IterationTokens:
        """Several engines' histograms added up (replicas of one model)."""
        counts = [sum(c) for c in zip(*(h.counts for h in histograms), strict=True)] or cls().counts
        return cls(tuple(counts), sum(h.tokens for h in histograms))


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
    spec_decode: SpecDecodeStats | None = None  # None: speculative decoding is off
    iteration_tokens: IterationTokens = field(default_factory=IterationTokens)


class LLMEngine:
    """Holds the tokenizer, model runner, scheduler and sampler; advances all requests one step at a time."""

    def __init__(self, config: EngineConfig):
        self.config = config
        threads = config.num_threads_per_rank()
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        model_path = config.resolved_model()
        self.model_config, self.tokenizer, weights = load_model_files(
            model_path, config.load_format, load_tokenizer=not config.skip_tokenizer_init)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        # With tensor parallelism the other ranks start first, and load their shards while we load ours.
        workers = Workers(config, self.max_model_len) if config.tensor_parallel_size > 1 else None
        try:
            self.runner = ModelRunner(config, mc, weights, self.max_model_len, workers=workers)
        except BaseException as e:
            if workers is not None:
                try:
                    if isinstance(e, RuntimeError):  # a collective failed: say which rank is gone, if one is
                        workers.raise_if_dead(e)
                finally:
                    workers.shutdown()
            raise
        # A sequence must fit the pool by itself, or preemption could not make room for it.
        self.max_model_len = min(self.max_model_len, self.runner.num_blocks * config.block_size)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(token_bitmask_op(self.runner.device, self.runner.ops))
        self.speculator: Speculator | None = None
        if config.speculative_config is not None:
            self.speculator = Speculator(config.speculative_config, self.max_model_len, mc.vocab_size,
                                         self.runner.device, self.runner.draft)
        self.eos_token_ids = set(mc.eos_token_id)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, _Request] = {}
        self._grammars: GrammarCompiler | None = None  # made on the first structured-output request
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.finished_reasons: dict[str, int] = {}
        self._iteration_counts = [0] * (len(ITERATION_TOKEN_BUCKETS) + 1)  # see IterationTokens
        self._iteration_tokens = 0
        self.faults = FaultInjector.parse(config.fault_injection)
        self.num_steps = 0
        logger.info("engine ready: %s, %s on %s, %d KV blocks of %d tokens, max_model_len %d",
                    mc.name, self.runner.dtype, self.runner.device, self.runner.num_blocks,
                    config.block_size, self.max_model_len)

    def shutdown(self) -> None:
        """End the tensor-parallel workers, if any, now (deleting the engine ends them too)."""
        self.runner.shutdown()

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
            if self.tokenizer is None:
                raise ValueError("prompt is text but the engine has no tokenizer (skip_tokenizer_init); "
                                 "give prompt_token_ids instead")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        return None, list(prompt)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None, lora_name: str | None = None) -> None:
        """Queue a request; lora_name picks a loaded LoRA adapter (add_lora) to run it with, None the base
        model. Raises ValueError (before taking any memory) if it cannot be served.

        A string prompt is tokenized here, in the caller's thread; the server hands token ids."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        lora_id = self._lora(lora_name).id if lora_name is not None else 0
        params = params or SamplingParams()
        text, ids = self.tokenize(prompt)
        ids = truncate_prompt(ids, params, self.max_model_len)
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer, and this engine has none (skip_tokenizer_init); "
                             "use stop_token_ids")
        self.config.limits.check_params(params)
        check_prompt(ids, params, self.model_config.vocab_size, self.max_model_len)
        grammar = None
        if params.structured_outputs is not None:  # within its size limit (check_params)
            # An invalid constraint, or one slower than the bound, fails here (the engine core awaited the
            # compile off its loop already, so for it this is a cache hit).
            grammar = self._grammar_compiler().compile(params.structured_outputs,
                                                       self.config.limits.max_constraint_compile_s)
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
            seq = Sequence(f"{request_id}#{i}", request_id, i, ids, params, detok, generator, arrival_time or now,
                           lora_id)
            if grammar is not None:
                seq.matcher = self._grammar_compiler().matcher(grammar)
            seqs.append(seq)
        req = _Request(request_id, text, ids, seqs, RequestMetrics(arrival_time or now))
        if self.faults is not None:
            req.fault_text = text if text is not None else self.tokenizer.decode(ids)
        # Only now, with nothing left that can fail, does the request enter the scheduler.
        self.requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)
        self.num_prompt_tokens += len(ids)

    def compile_grammar(self, params: SamplingParams) -> Future:
        """Start compiling params' structured-output constraint off this thread; a future of the compiled
        grammar (or of the ValueError that refuses it). add_request then finds it compiled: the engine core
        keeps stepping other requests meanwhile."""
        self.config.limits.check_params(params)
        return self._grammar_compiler().compile_async(params.structured_outputs)

    # ---- LoRA adapters -----------------------------------------------------------------------

    def add_lora(self, name: str, path: str) -> int:
        """Load the PEFT LoRA adapter folder at path under name, for requests to name; returns its id (never
        reused). ValueError if LoRA is off, the name is taken, all max_loras slots are full, or the folder is
        not an adapter of this model (the message says which)."""
        return self._lora_slots().add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter. Refused (ValueError) while requests that run it are in flight: a front end
        that unloads stops sending it requests, waits for (or aborts) those in flight, then removes it."""
        lora_id = self._lora(name).id
        in_flight = sum(1 for r in self.requests.values() if r.seqs[0].lora_id == lora_id)
        if in_flight:
            raise ValueError(f"LoRA adapter {name!r} serves {in_flight} request(s) in flight; remove it once "
                             "they finish, or abort them first")
        self.runner.loras.remove(name)

    def list_loras(self) -> list[LoRAInfo]:
        """The loaded adapters, oldest first (empty when LoRA is off)."""
        loras = self.runner.loras
        return sorted(loras.loras.values(), key=lambda info: info.id) if loras else []

    def _lora_slots(self) -> LoRASlots:
        if self.runner.loras is None:
            raise ValueError("LoRA adapters are off; start the engine with enable_lora=True (--enable-lora)")
        return self.runner.loras

    def _lora(self, name: str) -> LoRAInfo:
        loaded = self._lora_slots().loras
        if name not in loaded:
            raise ValueError(f"unknown LoRA adapter {name!r}; loaded: {', '.join(sorted(loaded)) or 'none'}")
        return loaded[name]

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
        """Run one forward pass; return a delta for every request that advanced (see the module doc)."""
        self.num_steps += 1
        if self.faults is not None:
            self.faults.on_step(self.num_steps)
        if self.speculator is not None:
            self.speculator.plan(self.scheduler.running)
        sched = self.scheduler.schedule()
        if sched.is_empty():
            return []
        if self.speculator is not None:
            self.speculator.propose(sched)
        now = time.time()
        for seq in sched.seqs:
            m = self.requests[seq.request_id].metrics
            m.first_scheduled_time = m.first_scheduled_time or now
        out = self.runner.execute(sched)
        for seq, n in zip(sched.seqs, sched.num_tokens, strict=False):
            seq.num_computed_tokens += n
        for seq, entries in out.prompt_logprobs:
            seq.prompt_logprobs += entries
        sample_seqs = out.sample_seqs
        if not sample_seqs:
            return []
        samples = self._sample(out.logits, sample_seqs)
        now = time.time()
        touched: dict[str, _Request] = {}
        row = 0
        step_tokens = 0  # as vLLM counts them: see IterationTokens
        for seq in sample_seqs:
            num_drafts = len(seq.spec_token_ids)
            rows, row = samples[row:row + 1 + num_drafts], row + 1 + num_drafts
            req = touched[seq.request_id] = self.requests[seq.request_id]
            if req.error is not None:  # an earlier sample of this request already failed it
                continue
            try:
                failed = next((r for r in rows if isinstance(r, Exception)), None)
                if failed is not None:
                    raise failed
                if num_drafts:  # the confirmed drafts, then the target's own token after them
                    rows = rows[:self.speculator.verified(seq, [r[0] for r in rows]) + 1]
                if not seq.output_token_ids:  # its prefill ends with this first token
                    step_tokens += seq.num_prompt_tokens
                for sample in rows:
                    self._append(seq, *sample)
                    self.num_generation_tokens += 1
                    step_tokens += 1
                    if self.faults is not None:
                        self.faults.on_token(req.fault_text)
                    if seq.is_finished:
                        break
                if num_drafts and not seq.is_finished:
                    self.block_manager.trim(seq)  # the rejected drafts' slots
            except Exception as e:
                self._fail_request(req, e)
            req.metrics.first_token_time = req.metrics.first_token_time or now
        if step_tokens:
            self._iteration_counts[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, step_tokens)] += 1
            self._iteration_tokens += step_tokens
        results = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = now
                del self.requests[req.request_id]
            results.append(self._delta(req))
        return results

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple | Exception]:
        """(token, logprob, top logprobs) per row, sampled as one batch: a row per sequence, and one more per
        draft token it verifies. If the batch fails, each row is sampled alone, so that a row at fault fails
        only its own request (its entry is the exception)."""
        rows = [(seq, j) for seq in seqs for j in range(1 + len(seq.spec_token_ids))]
        try:
            return self._sample_rows(logits, rows)
        except Exception as e:
            if len(rows) == 1:
                return [e]
            logger.warning("batched sampling failed (%s); sampling the %d rows one by one", e, len(rows))
        results: list[tuple | Exception] = []
        for i, row in enumerate(rows):
            try:
                results += self._sample_rows(logits[i:i + 1], [row])
            except Exception as e:
                results.append(e)
        return results

    def _sample_rows(self, logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> list[tuple]:
        """rows: (sequence, j): the row after the sequence's tokens and its first j draft tokens."""
        seqs = [s for s, _ in rows]
        if self.faults is not None:
            self.faults.on_sample([self.requests[s.request_id].fault_text for s in seqs])
        # The grammar masks first: on a GPU the forward is still running, and what follows may wait for it
        # (a copy from pageable host memory synchronizes), so the masks fill on the host meanwhile.
        bitmask = None
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]  # never with drafts
        if constrained:
            bitmask = (self._grammar_compiler().bitmask(len(seqs), constrained,
                                                        [seqs[i].matcher for i in constrained]), constrained)
        params = [s.params for s in seqs]
        states = None
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            states = [self._penalty_state(s) for s in seqs]  # penalized sequences have no drafts
        # A draft row sees the drafts before it as output (min_tokens counts them); the rest need no copy.
        outputs = [s.output_token_ids + s.spec_token_ids[:j] if j else s.output_token_ids for s, j in rows]
        meta = SamplingMetadata.build(
            params, [s.prompt_token_ids for s in seqs], outputs,
            [s.generator for s in seqs], self.model_config.vocab_size, logits.device, states, bitmask)
        if any(s.spec_token_ids for s in seqs):
            self._add_drafts(meta, rows, logits.device)
        out: SamplerOutput = self.sampler(logits, meta)
        return list(zip(out.token_ids, out.logprobs, out.top_logprobs, strict=False))

    def _add_drafts(self, meta: SamplingMetadata, rows: list[tuple[Sequence, int]], device: torch.device) -> None:
        """The draft token each row verifies (-1 on a sequence's last row), and a draft model's distributions."""
        drafts = [s.spec_token_ids[j] if j < len(s.spec_token_ids) else -1 for s, j in rows]
        meta.draft_token_ids = torch.tensor(drafts, dtype=torch.long, device=device)
        if any(s.spec_draft_probs is not None for s, _ in rows) and not meta.all_greedy:
            meta.draft_probs = torch.zeros(len(rows), meta.vocab_size, device=device)
            for i, (s, j) in enumerate(rows):
                if s.spec_draft_probs is not None and j < len(s.spec_token_ids):
                    meta.draft_probs[i] = s.spec_draft_probs[j]

    def _penalty_state(self, seq: Sequence) -> PenaltyState:
        if seq.penalty_state is None:
            seq.penalty_state = PenaltyState(seq.prompt_token_ids, self.model_config.vocab_size,
                                             self.runner.device)
        return seq.penalty_state

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need a tokenizer, and this engine has none "
                                 "(skip_tokenizer_init)")
            self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        return self._grammars

    def _append(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise RuntimeError(f"token {token} does not fit the request's structured output")
        seq.append_token(token)
        seq.cumulative_logprob += logprob
        if seq.logprobs is not None:
            entry = dict(top or [])
            entry[token] = logprob
            seq.logprobs.append(entry)
        params = seq.params
        num_out = len(seq.output_token_ids)
        # Stops of any kind count only once min_tokens are out (the sampler masks stop tokens until then).
        may_stop = num_out >= params.min_tokens
        if may_stop and (token in params.all_stop_token_ids or token in params.stop_token_ids):
            reason = None if token in params.all_stop_token_ids else token
            if params.include_stop_str_in_output and seq.detokenizer:
                seq.detokenizer.append([token])
            self._finish(seq, "stop", reason)
            return
        if seq.matcher is not None and seq.matcher.is_terminated():  # the grammar took its stop token
            self._finish(seq, "stop", None)
            return
        stop_str = seq.detokenizer.append([token], check_stops=may_stop) if seq.detokenizer else None
        if stop_str is not None:
            self._finish(seq, "stop", stop_str)
        elif num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        try:  # an aborted or failed sequence's text is never read: do not detokenize further
            if seq.detokenizer and not isinstance(stop_reason, str) and reason not in ("abort", "error"):
                # Releasing held-back bytes can complete a stop string after all.
                late_stop = seq.detokenizer.finish()
                if late_stop is not None:
                    reason, stop_reason = "stop", late_stop
        finally:  # whatever the detokenizer did, the sequence ends and its blocks come back
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)
            self.finished_reasons[reason] = self.finished_reasons.get(reason, 0) + 1

    def _fail_request(self, req: _Request, error: Exception) -> None:
        """End every sequence of req with finish_reason "error"; nothing else is touched."""
        logger.error("request %s failed: %s: %s", req.request_id, type(error).__name__, error)
        req.error = f"request {req.request_id} failed: {type(error).__name__}: {error}"
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, "error", None)
            elif not seq.finish_sent:  # finished in this very step, before the failure
                seq.finish_reason, seq.stop_reason = "error", None

    def _delta(self, req: _Request) -> RequestOutput:
        """What each sample of req gained since its last delta; samples that gained nothing are left out."""
        outs = []
        for s in req.seqs:
            new_tokens = s.output_token_ids[s.num_sent_tokens:]
            text = s.detokenizer.take_text() if s.detokenizer and req.error is None else ""
            finish_new = s.is_finished and not s.finish_sent
            if not (new_tokens or text or finish_new):
                continue
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=new_tokens,
                cumulative_logprob=s.cumulative_logprob if s.params.logprobs is not None else None,
                logprobs=s.logprobs[s.num_sent_tokens:] if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason))
            s.num_sent_tokens, s.finish_sent = len(s.output_token_ids), s.is_finished
        first = req.seqs[0]
        prompt_logprobs = None
        if first.prompt_logprobs is not None and len(first.prompt_logprobs) == first.num_prompt_tokens:
            prompt_logprobs, first.prompt_logprobs = first.prompt_logprobs, None  # handed out once
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             req.metrics, num_cached_tokens=first.num_cached_tokens, error=req.error,
                             prompt_logprobs=prompt_logprobs)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(), num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            prompt_tokens=self.num_prompt_tokens, generation_tokens=self.num_generation_tokens,
            finished_reasons=dict(self.finished_reasons),
            spec_decode=self.speculator.stats() if self.speculator is not None else None,
            iteration_tokens=IterationTokens(tuple(self._iteration_counts), self._iteration_tokens))
