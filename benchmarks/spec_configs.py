"""The servers that benchmarks/speculative.py compares, as data: a name, a backend and the flags that differ.

A config is only the flags; `server_command` adds what every point shares (model, host, port, the
per-slot context) and fills the `$draft_hf` / `$draft_gguf` placeholders with the self-draft's paths
(benchmarks/self_draft.py). Add a proposer or a k by adding a line here.

tokenmill's speculation takes vLLM's `--speculative-config JSON` (issue 26): a checkout without it
rejects the flag, and those points are recorded as failed rather than stopping the sweep.
"""

from __future__ import annotations

import json
import string
import sys
from dataclasses import dataclass

# Every slot (llama-server) and every sequence (tokenmill) gets this much context: room for the
# longest prompt plus the greedy workload's 512-token cap.
CONTEXT = 2048
MAX_NUM_SEQS = 32


def _ngram(k: int, lo: int = 2, hi: int = 5) -> str:
    return json.dumps({"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo,
                       "prompt_lookup_max": hi})


def _draft(k: int, path: str = "$draft_hf") -> str:
    return json.dumps({"model": path, "num_speculative_tokens": k})


@dataclass(frozen=True)
class ServerConfig:
    name: str
    backend: str  # "tokenmill" or "llama.cpp"
    args: tuple[str, ...]  # the flags that make this config; may hold $draft_hf / $draft_gguf
    baseline: str | None = None  # the speculation-off config this one is compared with
    proposer: str = "off"  # off | ngram | draft: a label for the table

    @property
    def needs_hf_draft(self) -> bool:
        return any("$draft_hf" in a for a in self.args)

    @property
    def needs_gguf_draft(self) -> bool:
        return any("$draft_gguf" in a for a in self.args)


_GGUF = ("--quantization", "gguf")
_F32 = ("--dtype", "float32")
_SPEC = "--speculative-config"

CONFIGS: tuple[ServerConfig, ...] = (
    ServerConfig("tm-gguf", "tokenmill", _GGUF),
    ServerConfig("tm-gguf-ngram-k2", "tokenmill", (*_GGUF, _SPEC, _ngram(2)), "tm-gguf", "ngram"),
    ServerConfig("tm-gguf-ngram-k4", "tokenmill", (*_GGUF, _SPEC, _ngram(4)), "tm-gguf", "ngram"),
    ServerConfig("tm-gguf-draft-k3", "tokenmill", (*_GGUF, _SPEC, _draft(3)), "tm-gguf", "draft"),
    ServerConfig("tm-f32", "tokenmill", _F32),
    ServerConfig("tm-f32-ngram-k2", "tokenmill", (*_F32, _SPEC, _ngram(2)), "tm-f32", "ngram"),
    ServerConfig("tm-f32-ngram-k4", "tokenmill", (*_F32, _SPEC, _ngram(4)), "tm-f32", "ngram"),
    ServerConfig("tm-f32-draft-k3", "tokenmill", (*_F32, _SPEC, _draft(3)), "tm-f32", "draft"),
    ServerConfig("llama", "llama.cpp", ()),
    # llama-server's prompt lookup: match the last 3 tokens in the context, draft up to 4 that followed.
    ServerConfig("llama-ngram", "llama.cpp", ("--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                                              "--spec-ngram-simple-size-m", "4"), "llama", "ngram"),
    # The same self-draft as tokenmill's, but the target's own Q4_1 tensors (self_draft.py --format gguf).
    ServerConfig("llama-draft-k3", "llama.cpp", ("--spec-type", "draft-simple", "-md", "$draft_gguf",
                                                 "--spec-draft-n-max", "3"), "llama", "draft"),
)
BY_NAME = {c.name: c for c in CONFIGS}
# The default sweep: both backends with and without speculation, on tokenmill's fastest CPU mode.
DEFAULT_CONFIGS = ("tm-gguf", "tm-gguf-ngram-k2", "tm-gguf-ngram-k4", "tm-gguf-draft-k3", "tm-f32",
                   "llama", "llama-ngram", "llama-draft-k3")


def pick(names: str) -> list[ServerConfig]:
    """Configs by a comma list of names; "all" for every one, "default" for DEFAULT_CONFIGS."""
    out: list[ServerConfig] = []
    for name in (n.strip() for n in names.split(",")):
        group = {"all": [c.name for c in CONFIGS], "default": list(DEFAULT_CONFIGS)}.get(name, [name])
        for n in group:
            if n not in BY_NAME:
                raise ValueError(f"unknown config {n!r}; known: {', '.join(BY_NAME)}")
            if BY_NAME[n] not in out:
                out.append(BY_NAME[n])
    return out


def server_command(cfg: ServerConfig, *, model: str, port: int, concurrency: int, draft_hf: str = "",
                   draft_gguf: str = "", llama_server: str = "", python: str = sys.executable) -> list[str]:
    """The argv that starts `cfg` for one point (`concurrency` requests in flight)."""
    args = [string.Template(a).substitute(draft_hf=draft_hf, draft_gguf=draft_gguf) for a in cfg.args]
    if cfg.backend == "tokenmill":
        return [python, "-m", "tokenmill.api.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", str(CONTEXT), "--max-num-seqs", str(MAX_NUM_SEQS), *args]
    if cfg.backend == "llama.cpp":
        # One slot per request in flight, each with a full context; 2 threads, the VM's cores.
        slots = max(1, concurrency)
        return [llama_server, "-m", model, "-t", "2", "-np", str(slots), "-c", str(slots * CONTEXT),
                "--host", "127.0.0.1", "--port", str(port), *args]
    raise ValueError(f"unknown backend {cfg.backend!r}")
