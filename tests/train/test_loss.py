"""The chunked loss equals the plain one (values and gradients) and keeps far less for backward."""

from __future__ import annotations

import pytest
import torch

from lorafleet.data.encode import IGNORE_INDEX
from lorafleet.segments import Segment
from lorafleet.train.loss import chunked_segment_losses, segment_losses


def saved_bytes(fn, exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `fn` runs (storages whose
    address is in `exclude` left out)."""
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in exclude:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def labelled(shape, vocab, generator):
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.6] = IGNORE_INDEX  # prompts, images, padding
    return labels


@pytest.mark.parametrize("by_token", [False, True], ids=["rows", "packed"])
def test_chunked_loss_equals_the_full_logits_loss(by_token):
    generator = torch.Generator().manual_seed(0)
    vocab, width = 97, 16
    head = torch.nn.Linear(width, vocab, bias=False)
    rows, length = (1, 40) if by_token else (5, 9)
    segments = (
        [Segment("a", 0, 12), Segment("b", 12, 30), Segment("c", 30, 40)]
        if by_token
        else [Segment("a", 0, 2), Segment("b", 2, 3), Segment("c", 3, 5)]
    )
    hidden = torch.randn(rows, length, width, generator=generator, requires_grad=True)
    labels = labelled((rows, length), vocab, generator)

    expected = segment_losses(head(hidden), labels, segments, by_token=by_token)
    torch.stack(expected).sum().backward()
    expected_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    # 5 rows per chunk: many chunks, the last one short
    ours = chunked_segment_losses(hidden, head, labels, segments, by_token=by_token, chunk_elements=5 * vocab)
    torch.stack(ours).sum().backward()
    assert torch.allclose(torch.stack(ours), torch.stack(expected), atol=1e-6)
    assert torch.allclose(hidden.grad, expected_grads[0], atol=1e-6)
    assert torch.allclose(head.weight.grad, expected_grads[1], atol=1e-6)


def test_a_segment_without_labels_has_zero_loss_and_backward_still_runs():
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 2] = 3
    losses = chunked_segment_losses(hidden, head, labels, [Segment("a", 0, 1), Segment("b", 1, 2)])
    assert losses[1].item() == 0 and losses[0].item() > 0
    sum(losses).backward()
    assert hidden.grad is not None


def test_chunked_loss_keeps_a_fraction_of_what_full_logits_keep():
    vocab, width, tokens = 4096, 32, 512
    head = torch.nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(4, tokens // 4, width, requires_grad=True)
    labels = labelled((4, tokens // 4), vocab, torch.Generator().manual_seed(1))
    segments = [Segment("a", 0, 2), Segment("b", 2, 4)]
    full = saved_bytes(lambda: segment_losses(head(hidden), labels, segments))
    chunked = saved_bytes(lambda: chunked_segment_losses(hidden, head, labels, segments, chunk_elements=64 * vocab))
    assert full >= tokens * vocab * 4  # at least the fp32 logits
    assert chunked < full / 10
