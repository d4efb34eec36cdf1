import math
import re

import pytest
import torch
import torch.nn.functional as F

from rlhf_course.reward import losses

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(dtype, requires_grad=True):
    chosen = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=dtype, requires_grad=requires_grad)
    rejected = torch.tensor([0.0, 1.0, 0.5, -1.0], dtype=dtype, requires_grad=requires_grad)
    return chosen, rejected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [1e4, -1e4])
@pytest.mark.parametrize("loss_fn", [losses.log_sig_loss, losses.log_exp_loss])
def test_stable_losses_finite_at_huge_margin(loss_fn, margin, dtype):
    chosen, rejected = _pair(dtype)
    loss = loss_fn(chosen, rejected, margin=margin)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    if margin > 0:  # every pair is far on the wrong side: loss ~ margin, gradient ~ -1/N on chosen
        assert loss.float().item() == pytest.approx(margin, rel=2e-2)
        assert chosen.grad.float().tolist() == pytest.approx([-0.25] * 4, rel=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_naive_form_breaks_at_huge_margin(dtype):
    chosen, rejected = _pair(dtype)
    loss = losses.naive_log_sig_loss(chosen, rejected, margin=1e4)
    loss.backward()
    assert torch.isinf(loss)
    assert torch.isnan(chosen.grad).any()


def test_naive_form_agrees_in_safe_range():
    chosen, rejected = _pair(torch.float64, requires_grad=False)
    assert losses.naive_log_sig_loss(chosen, rejected).item() == pytest.approx(
        losses.log_sig_loss(chosen, rejected).item(), abs=1e-12
    )


def test_log_sig_and_log_exp_are_the_same_function():
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randn(256, generator=generator, dtype=torch.float64) * 30
    rejected = torch.randn(256, generator=generator, dtype=torch.float64) * 30
    margin = torch.rand(256, generator=generator, dtype=torch.float64) * 5
    a = losses.log_sig_loss(chosen, rejected, margin)
    b = losses.log_exp_loss(chosen, rejected, margin)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert losses.log_sig_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


def test_margin_tensor_and_scalar_agree_and_shift_loss():
    chosen, rejected = _pair(torch.float32, requires_grad=False)
    tensor_margin = losses.log_sig_loss(chosen, rejected, torch.full((4,), 2.0))
    scalar_margin = losses.log_sig_loss(chosen, rejected, 2.0)
    assert tensor_margin.item() == pytest.approx(scalar_margin.item())
    assert scalar_margin > losses.log_sig_loss(chosen, rejected)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="same shape"):
        losses.log_sig_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        losses.log_exp_loss(torch.zeros(0), torch.zeros(0))


NON_FINITE = [float("nan"), float("inf"), -float("inf")]
PAIRWISE = [losses.log_sig_loss, losses.log_exp_loss, losses.naive_log_sig_loss, losses.reward_centering_loss]


@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("loss_fn", PAIRWISE)
def test_non_finite_rewards_raise_unless_told_not_to_check(loss_fn, bad):
    # Issue 17: every loss took NaN/inf rewards without a word (and returned NaN or inf).
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, bad, 1.0])
    with pytest.raises(ValueError, match=r"rejected rewards must be finite, got .* \(first at index 1: .*check_finite=False"):
        loss_fn(chosen, rejected)
    with pytest.raises(ValueError, match="chosen rewards must be finite"):
        loss_fn(rejected, chosen)
    assert loss_fn(chosen, rejected, check_finite=False).dim() == 0  # the old behaviour, on request


def test_non_finite_margin_and_kwise_rewards_raise():
    chosen, rejected = _pair(torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="margin is inf"):
        losses.log_sig_loss(chosen, rejected, margin=float("inf"))
    with pytest.raises(ValueError, match="margin must be finite, got 1 NaN"):
        losses.log_exp_loss(chosen, rejected, margin=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"rewards must be finite, got 1 NaN and 0 inf among 6 values \(first at index \(1, 2\)"):
        losses.kwise_ranking_loss(torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, float("nan")]]))
    assert torch.isnan(losses.kwise_ranking_loss(torch.tensor([[1.0, float("nan")]]), check_finite=False))


def test_naive_loss_still_overflows_from_finite_rewards():
    # Notebook 01's demonstration: the inputs are finite, the naive loss is what returns inf.
    chosen, rejected = _pair(torch.float16)
    assert torch.isinf(losses.naive_log_sig_loss(chosen, rejected, margin=1e4))


@pytest.mark.parametrize("margin_shape", [(4, 1), (1, 4), (2,), (1,)])
@pytest.mark.parametrize("loss_fn", [losses.log_sig_loss, losses.log_exp_loss, losses.naive_log_sig_loss])
def test_a_margin_of_another_shape_is_refused_not_broadcast(loss_fn, margin_shape):
    # Issue 17: a (4, 1) margin broadcast against (4,) rewards into a 4x4 average of every pair's rewards with
    # every other pair's margin.
    chosen, rejected = _pair(torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match=rf"margin has shape {re.escape(str(margin_shape))} but the rewards have shape \(4,\)"):
        loss_fn(chosen, rejected, margin=torch.ones(margin_shape))


def test_scalar_margins_of_every_kind_agree():
    chosen, rejected = _pair(torch.float32, requires_grad=False)
    expected = losses.log_sig_loss(chosen, rejected, torch.full((4,), 1.5))
    for margin in (1.5, torch.tensor(1.5), torch.tensor(1.5, dtype=torch.float64), [1.5] * 4):
        assert torch.equal(losses.log_sig_loss(chosen, rejected, margin), expected)


def test_pairwise_accuracy_refuses_nan():
    # Issue 17: a NaN compared False, so [1, NaN] vs [0, 0] gave 0.5.
    chosen, rejected = torch.tensor([1.0, float("nan")]), torch.tensor([0.0, 0.0])
    for check_finite in (True, False):
        with pytest.raises(ValueError, match="chosen rewards"):
            losses.pairwise_accuracy(chosen, rejected, check_finite=check_finite)
    with pytest.raises(ValueError, match="chosen rewards must be finite, got 0 NaN and 1 inf"):
        losses.pairwise_accuracy(torch.tensor([float("inf"), 0.0]), torch.tensor([0.0, 1.0]))
    assert losses.pairwise_accuracy(torch.tensor([float("inf"), 0.0]), torch.tensor([0.0, 1.0]), check_finite=False) == 0.5


def test_pairwise_accuracy():
    assert losses.pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(1 / 3)


def test_kwise_with_k2_equals_pairwise():
    rewards = torch.tensor([[1.0, 0.2], [-1.0, 0.5]])
    assert losses.kwise_ranking_loss(rewards).item() == pytest.approx(
        losses.log_sig_loss(rewards[:, 0], rewards[:, 1]).item()
    )


def test_kwise_matches_explicit_pair_loop_with_ranks_and_ties():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 4, generator=generator, requires_grad=True)
    ranks = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3], [1, 1, 0, 2]])
    expected = []
    for row in range(3):
        pairs = losses.kwise_pairs(ranks[row])
        terms = [-F.logsigmoid(rewards[row, b] - rewards[row, w]) for b, w in pairs]
        expected.append(torch.stack(terms).mean())
    assert len(losses.kwise_pairs(ranks[0])) == math.comb(4, 2)
    assert len(losses.kwise_pairs(ranks[2])) == math.comb(4, 2) - 1  # one tie skipped
    loss = losses.kwise_ranking_loss(rewards, ranks)
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(rewards.grad).all()


def test_kwise_rejects_bad_input():
    with pytest.raises(ValueError, match="K >= 2"):
        losses.kwise_ranking_loss(torch.zeros(3))
    with pytest.raises(ValueError, match="tied"):
        losses.kwise_ranking_loss(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))


def test_kwise_finite_at_huge_rewards():
    for dtype in DTYPES:
        rewards = torch.tensor([[-1e4, 0.0, 1e4]], dtype=dtype, requires_grad=True)
        loss = losses.kwise_ranking_loss(rewards)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(rewards.grad).all()


def test_reward_centering():
    chosen = torch.tensor([3.0, 1.0])
    rejected = torch.tensor([1.0, -1.0])
    assert losses.reward_centering_loss(chosen, rejected, 0.5).item() == pytest.approx(0.5 * (16 + 0) / 2)
    # shifting every reward changes the centring term but not the pairwise loss
    assert losses.log_sig_loss(chosen + 5, rejected + 5).item() == pytest.approx(losses.log_sig_loss(chosen, rejected).item())


def test_two_class_ce_loss():
    logits = torch.tensor([[0.0, 10.0], [10.0, 0.0]])
    assert losses.two_class_ce_loss(logits, torch.tensor([1, 0])).item() < 1e-3
    assert losses.two_class_ce_loss(logits, torch.tensor([0, 1])).item() > 9
    with pytest.raises(ValueError, match="batch, 2"):
        losses.two_class_ce_loss(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_regression_loss():
    assert losses.regression_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="differs"):
        losses.regression_loss(torch.zeros(2), torch.zeros(3))


def test_multi_objective_regression_masks_missing_aspects():
    predicted = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.0, float("nan"), 2.0], [2.0, float("nan"), 0.0]])
    loss, per_aspect = losses.multi_objective_regression_loss(predicted, target)
    assert loss.item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert per_aspect[0].item() == pytest.approx(2.5) and math.isnan(per_aspect[1].item())
    loss.backward()
    assert predicted.grad[:, 1].abs().sum() == 0  # no gradient through an unrated aspect
    mask = torch.tensor([[True, False, False], [False, False, False]])
    loss_masked, _ = losses.multi_objective_regression_loss(predicted, target, mask)
    assert loss_masked.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no aspect"):
        losses.multi_objective_regression_loss(predicted, target, torch.zeros(2, 3, dtype=torch.bool))


def test_standardize_per_rater_makes_scales_agree():
    scores = torch.tensor([0.8, 0.7, 0.6, 0.5])
    raters = torch.tensor([0, 0, 1, 1])
    z = losses.standardize_per_rater(scores, raters)
    assert z.tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-4)
