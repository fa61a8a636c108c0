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
