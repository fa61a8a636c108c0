"""LLM: offline batch generation, in vLLM's shape."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.core.llm_engine import LLMEngine, PromptType
from tokenmill.engine.limits import check_prompt
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from tokenmill.engine.sampling.sampling_params import SamplingParams
from tokenmill.engine.weights.lora import LoRAInfo


class LLM:
    """Generate text for many prompts at once with continuous batching.

    >>> llm = LLM()  # the packaged SmolLM2-135M-Instruct
    >>> llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 block_size: int = 16, max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 kv_cache_memory: int | None = None, enable_prefix_caching: bool = True, seed: int = 0,
                 load_format: str = "auto", max_model_len: int | None = None, **kwargs):
        self.config = EngineConfig(
            model=model, dtype=dtype, device=device, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=enable_prefix_caching, seed=seed, load_format=load_format,
            max_model_len=max_model_len, **kwargs)
        self.engine = LLMEngine(self.config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def add_lora(self, name: str, path: str) -> int:
        """Load a PEFT LoRA adapter folder (needs enable_lora=True); see LLMEngine.add_lora."""
        return self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def list_loras(self) -> list[LoRAInfo]:
        return self.engine.list_loras()

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_name: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """Outputs in the order of the prompts. A prompt is a string, a list of token ids, or
        {"prompt_token_ids": [...]}; one SamplingParams applies to all, or give one per prompt. lora_name
        names a loaded LoRA adapter (add_lora) for all prompts, or one per prompt (None: the base model)."""
        prompts = _listed(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
        if lora_name is None or isinstance(lora_name, str):
            lora_name = [lora_name] * len(prompts)
        if len(lora_name) != len(prompts):
            raise ValueError(f"got {len(lora_name)} lora_name for {len(prompts)} prompts")
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for rid, prompt, params, lora in zip(ids, prompts, sampling_params, lora_name, strict=True):
                self.engine.add_request(rid, prompt, params, lora_name=lora)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams,
                    lora_name: str | None = None, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: for each prompt (as generate takes them), params.beam_width sequences, best first,
        as transformers' generate(num_beams=beam_width, do_sample=False) finds them (sampling/beam_search.py).

        Each round runs every live beam of every prompt as a one-token greedy request whose prompt is the prompt's
        ids and the beam's tokens; the prefix cache serves each up to its last full block, so a prompt's beams
        share their KV blocks and a round computes at most a block's worth of tokens per beam. Raises ValueError
        (InvalidRequestError) for a beam width or prompt the engine cannot serve, before anything runs."""
        engine = self.engine
        searches = []
        for prompt in _listed(prompts):
            ids = engine.tokenize(prompt)[1]
            search = BeamSearch(ids, params, engine.eos_token_ids, engine.max_model_len)
            self.config.limits.check_beam_width(params.beam_width, len(search.eos))
            check_prompt(ids, search.request_params.clone(max_tokens=max(search.max_tokens, 1)),
                         engine.model_config.vocab_size, engine.max_model_len)
            searches.append(search)
        with tqdm(total=max((s.max_tokens for s in searches), default=0), desc="Beam search",
                  disable=not use_tqdm, dynamic_ncols=True) as bar:
            while live := [s for s in searches if not s.done]:
                self._beam_round(live, lora_name)
                bar.update(1)
        tok, outputs = self.get_tokenizer(), []
        for search in searches:
            outputs.append(BeamSearchOutput(search.best()))
            for seq in outputs[-1].sequences:
                seq.text = tok.decode(search.text_token_ids(seq), skip_special_tokens=True) if tok else None
        return outputs

    def _beam_round(self, searches: list[BeamSearch], lora_name: str | None) -> None:
        """One round of every search: its live beams' one-token requests, run as one batch."""
        requests = [(str(next(self._ids)), s, ids) for s in searches for ids in s.prompts()]
        try:
            for rid, search, ids in requests:
                self.engine.add_request(rid, ids, search.request_params, lora_name=lora_name)
        except Exception:
            self.engine.abort_request([rid for rid, _, _ in requests])
            raise
        outs = self._run([rid for rid, _, _ in requests], use_tqdm=False)
        failed = next((o.error for o in outs if o.error is not None), None)
        if failed is not None:
            raise RuntimeError(failed)
        for search in searches:
            search.advance([o.outputs[0].logprobs[0] for o, (_, s, _) in zip(outs, requests, strict=True)
                            if s is search])

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             lora_name: str | Seq[str | None] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = [{"prompt_token_ids": tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                                tokenize=True, return_dict=False)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_name)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final = {}  # request id -> its deltas folded into one output
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        prompt_tokens = out_tokens = 0
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    out = final.setdefault(delta.request_id, RequestOutput.empty(delta))
                    out.add(delta)
                    if out.finished:
                        prompt_tokens += len(out.prompt_token_ids)
                        out_tokens += sum(len(o.token_ids) for o in out.outputs)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"in: {prompt_tokens / elapsed:.0f} tok/s, "
                                            f"out: {out_tokens / elapsed:.0f} tok/s", refresh=False)
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return [final[i] for i in ids]


def _listed(prompts: PromptType | Seq[PromptType]) -> list[PromptType]:
    """One prompt (a string, a list of ids or a dict) or many, as a list."""
    if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)
