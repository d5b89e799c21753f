"""Sentence entropy: exact values of hand-made histograms."""

from __future__ import annotations

import math

import pytest
import torch

from dsl.errors import UserError
from dsl.eval.entropy import sentence_entropy, sequence_entropy


def test_exact_histogram_entropies():
    assert sequence_entropy([5, 5, 5, 5]) == 0.0
    assert sequence_entropy([0, 1, 2, 3, 4, 5, 6, 7]) == pytest.approx(math.log(8))
    assert sequence_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
    assert sequence_entropy([9, 9, 3, 4]) == pytest.approx(1.5 * math.log(2))


def test_mean_over_sequences_and_tensor_input():
    ids = torch.tensor([[5, 5, 5, 5], [1, 1, 2, 2]])
    assert sentence_entropy(ids) == pytest.approx(math.log(2) / 2)
    assert sentence_entropy([[1, 2], [3, 3, 3]]) == pytest.approx(math.log(2) / 2)


def test_empty_input_is_a_user_error():
    with pytest.raises(UserError):
        sentence_entropy([])
    with pytest.raises(UserError):
        sentence_entropy([[]])
