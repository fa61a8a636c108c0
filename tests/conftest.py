"""Shared fixtures. Without a GPU, Triton kernels run under the interpreter: the variable must be set
before anything imports triton, hence here, at the top of the run."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct, byte-level BPE), from the installed GGUF."""
    from tokenmill.engine.config import default_model_path
    from tokenmill.engine.weights.gguf_tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(default_model_path())


@pytest.fixture(scope="session")
def hf_model():
    """transformers' own float32 model of the default GGUF, the reference for greedy and beam outputs (its
    load takes about 23 s here: once per run)."""
    from transformers import AutoModelForCausalLM

    from tokenmill.engine.config import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()
