"""Llama 3's document mask without an S x S tensor (``DocumentMask``: per-document causal
attention) against two independent references: each document run through the model alone at its
own positions, and the dense mask built from its definition (same document and causal)."""

from __future__ import annotations

import pytest
import torch

from llamalab.config import get_preset
from llamalab.model import DocumentMask, Transformer
from llamalab.train.speed import use_matmul_attention


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", max_seq_len=256))
    model.init_weights()
    return model


def _doc_ids(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])


LAYOUTS = [[[30, 40, 26], [96]], [[1, 95], [50, 1, 45]], [[12] * 8, [7, 89]]]


@pytest.mark.parametrize("lengths", LAYOUTS)
def test_segments_equal_each_document_alone(lengths: list[list[int]]) -> None:
    model = _model()
    model.document_attention = "segments"
    doc_ids = _doc_ids(lengths)
    tokens = torch.randint(0, 256, doc_ids.shape, generator=torch.Generator().manual_seed(1))
    assert isinstance(model._mask(torch.arange(doc_ids.shape[1]), doc_ids, doc_ids.shape[1]), DocumentMask)
    with torch.no_grad():
        packed = model(tokens, doc_ids=doc_ids)
        for b, row in enumerate(lengths):
            start = 0
            for n in row:  # the document alone, at the positions it has in the packed row
                alone = model(tokens[b:b + 1, start:start + n], input_pos=torch.arange(start, start + n))
                torch.testing.assert_close(packed[b:b + 1, start:start + n], alone, rtol=1e-5, atol=1e-5)
                start += n


@pytest.mark.parametrize("lengths", LAYOUTS)
def test_segments_equal_the_dense_mask_with_gradients(lengths: list[list[int]]) -> None:
    doc_ids = _doc_ids(lengths)
    tokens = torch.randint(0, 256, doc_ids.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for how in ("dense", "segments"):
        model = _model()
        model.document_attention = how
        model(tokens, doc_ids=doc_ids).logsumexp(-1).mean().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-6)


def test_dense_form_is_same_document_and_causal() -> None:
    doc_ids = _doc_ids([[3, 5, 2], [10]])
    mask = DocumentMask.from_doc_ids(doc_ids)
    s = doc_ids.shape[1]
    want = torch.zeros(2, 1, s, s, dtype=torch.bool)
    for b in range(2):
        for i in range(s):
            for j in range(s):
                want[b, 0, i, j] = j <= i and bool(doc_ids[b, i] == doc_ids[b, j])
    assert torch.equal(mask.dense(), want)
    assert mask.segments == [[(0, 3), (3, 8), (8, 10)], [(0, 10)]]


def test_scattered_documents_fall_back_to_the_dense_mask() -> None:
    doc_ids = torch.tensor([[0, 0, 1, 1, 0, 0]])  # document 0 in two places: only a dense mask says that
    assert DocumentMask.from_doc_ids(doc_ids) is None
    model = _model()
    model.document_attention = "segments"
    mask = model._mask(torch.arange(6), doc_ids, 6)
    assert isinstance(mask, torch.Tensor) and bool(mask[0, 0, 5, 0]) and not bool(mask[0, 0, 5, 2])


def test_auto_picks_segments_for_long_documents_only() -> None:
    model = _model()
    long_docs, short_docs = _doc_ids([[128, 128]]), _doc_ids([[4] * 64])
    assert isinstance(model._mask(torch.arange(256), long_docs, 256), DocumentMask)
    assert isinstance(model._mask(torch.arange(256), short_docs, 256), torch.Tensor)
    model.document_attention = "sparse"
    with pytest.raises(ValueError, match="document_attention"):
        model._mask(torch.arange(256), long_docs, 256)


def test_segments_under_the_matmul_attention_of_bf16_training() -> None:
    doc_ids = _doc_ids([[40, 60], [100]])
    tokens = torch.randint(0, 256, doc_ids.shape, generator=torch.Generator().manual_seed(3))
    outs = []
    for how in ("dense", "segments"):
        model = _model()
        use_matmul_attention(model)
        model.document_attention = how
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            outs.append(model(tokens, doc_ids=doc_ids).float())
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
