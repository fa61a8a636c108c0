import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct, byte-level BPE), from the installed GGUF."""
    from engine.config import default_model_path
    from engine.loader import load_gguf_tokenizer

    return load_gguf_tokenizer(default_model_path())
