import math

import pytest
import torch

from bench import metrics


def test_accuracy_hand_computed():
    assert metrics.accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    assert math.isnan(metrics.accuracy(torch.tensor([]), torch.tensor([])))


def test_asr_and_ra_on_same_triggered_set():
    target = torch.zeros(5, dtype=torch.long)
    y_true = torch.tensor([1, 2, 3, 1, 2])
    pred = torch.tensor([0, 0, 3, 1, 0])  # 3 fooled, 2 correct
    assert metrics.attack_success_rate(pred, target) == 0.6
    assert metrics.robust_accuracy(pred, y_true) == 0.4


def test_isolation_quality_counts_only_kind_1():
    kind = torch.tensor([0, 1, 1, 2, 0, 1])
    flagged = torch.tensor([True, True, False, True, False, True])
    p, r = metrics.isolation_quality(flagged, kind)
    assert p == 2 / 4  # the cover sample (kind 2) is a false positive
    assert r == 2 / 3
    p, r = metrics.isolation_quality(torch.zeros(6, dtype=torch.bool), kind)
    assert math.isnan(p) and r == 0.0


def test_kept_poison_fraction_is_poison_share_of_the_unflagged():
    kind = torch.tensor([0, 1, 1, 2, 0, 1])
    flagged = torch.tensor([True, True, False, True, False, False])
    # kept: indices 2, 4, 5 -> two poisoned (kind 1) of three
    assert metrics.kept_poison_fraction(flagged, kind) == 2 / 3
    assert metrics.kept_poison_fraction(kind == 1, kind) == 0.0
    assert math.isnan(metrics.kept_poison_fraction(torch.ones(6, dtype=torch.bool), kind))


def test_der_matches_definition():
    # ASR drops 0.9, BA drops 0.02 -> (0.9 - 0.02 + 1) / 2
    assert abs(metrics.der(0.90, 0.95, 0.88, 0.05) - 0.94) < 1e-9
    # a defense that raises BA and ASR: no credit, no penalty
    assert metrics.der(0.8, 0.5, 0.9, 0.6) == 0.5


def test_non_target_and_per_class_accuracy():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([1, 1, 1, 0, 2, 2])  # class 0 all wrong, class 1 half, class 2 right
    assert metrics.non_target_accuracy(pred, y, 0) == pytest.approx(3 / 4)
    assert metrics.non_target_accuracy(pred, y, 2) == pytest.approx(1 / 4)
    assert metrics.non_target_accuracy(pred, y, None) == metrics.accuracy(pred, y) == 0.5
    acc = metrics.class_accuracies(pred, y, 4)
    assert acc[:3] == [0.0, 0.5, 1.0] and math.isnan(acc[3])  # class 3 has no test image
