"""The structured-output token mask: the C++ op and the reference against xgrammar's
apply_token_bitmask_inplace, on masks mixing whole allowed words, whole forbidden words and mixed words, with a
vocab that is not a multiple of 32 and a mask wider than the logits."""
import pytest
import torch

from tokenmill.kernels import cpu, reference

xgr = pytest.importorskip("xgrammar")
if not cpu.load():
    pytest.skip("the C++ CPU ops did not build here (see the warning logged)", allow_module_level=True)

from tokenmill.kernels.cpu import ops  # noqa: E402  (only importable once the library loaded)


def grammar_like_mask(batch: int, words: int) -> torch.Tensor:
    """int32 words: a third all ones, a third all zeros, a third random bits (sign bit included)."""
    kind = torch.randint(0, 3, (batch, words))
    bits = torch.randint(-2**31, 2**31 - 1, (batch, words), dtype=torch.int32)
    return torch.where(kind == 0, -1, torch.where(kind == 1, 0, bits)).to(torch.int32)


def expected(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
    out = logits.float().clone()
    xgr.apply_token_bitmask_inplace(out, bitmask, indices=rows)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,words", [(49152, 1536), (1000, 32), (1000, 40), (70, 3), (31, 1)],
                         ids=["a multiple of 32", "not a multiple of 32", "a mask wider than the logits",
                              "a short tail word", "one partial word"])
@pytest.mark.parametrize("rows", [None, [0, 2, 5], []], ids=["all rows", "some rows", "no rows"])
@pytest.mark.parametrize("apply", [ops.apply_token_bitmask, reference.apply_token_bitmask], ids=["cpp", "reference"])
def test_token_bitmask_matches_xgrammar(apply, rows, vocab, words, dtype):
    logits = torch.randn(6, vocab).to(dtype)
    bitmask = grammar_like_mask(6, words)
    want = expected(logits, bitmask, rows)
    apply(logits, bitmask, rows)
    assert torch.equal(logits.float(), want)


def test_token_bitmask_on_strided_rows_leaves_the_rest_alone():
    big = torch.randn(4, 200)
    logits, beyond = big[:, :100], big[:, 100:].clone()  # rows of stride 200: columns 100.. stay as they are
    bitmask = grammar_like_mask(4, 4)
    want = expected(logits, bitmask, [1, 3])
    ops.apply_token_bitmask(logits, bitmask, [1, 3])
    assert torch.equal(logits, want) and torch.equal(big[:, 100:], beyond)


def test_token_bitmask_op_passes_opcheck():
    torch.library.opcheck(torch.ops.tokenmill.apply_token_bitmask,
                          (torch.randn(3, 70), grammar_like_mask(3, 3), torch.tensor([0, 2])))
