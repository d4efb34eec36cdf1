import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_course.reward import token_loss as tl
from rlhf_course.course import benchmarks


def _batch(rows, length):
    """rows: list of (chosen_ids, rejected_ids) lists of ints; right-pads with id 0 to ``length``."""
    generator = torch.Generator().manual_seed(len(rows) * 1000 + length)
    out = {k: [] for k in ("chosen_ids", "rejected_ids", "chosen_mask", "rejected_mask")}
    for chosen, rejected in rows:
        for side, ids in (("chosen", chosen), ("rejected", rejected)):
            out[f"{side}_ids"].append(ids + [0] * (length - len(ids)))
            out[f"{side}_mask"].append([1] * len(ids) + [0] * (length - len(ids)))
    batch = {k: torch.tensor(v) for k, v in out.items()}
    batch["chosen_values"] = torch.randn(len(rows), length, generator=generator, dtype=torch.float64, requires_grad=True)
    batch["rejected_values"] = torch.randn(len(rows), length, generator=generator, dtype=torch.float64, requires_grad=True)
    return batch


def _both(batch):
    reference = tl.token_level_pairwise_loss_reference(**batch)
    vectorised = tl.token_level_pairwise_loss(**batch)
    return reference, vectorised


def _assert_same(batch):
    reference, vectorised = _both(batch)
    assert vectorised.loss.item() == pytest.approx(reference.loss.item(), abs=1e-6)
    torch.testing.assert_close(vectorised.chosen_scores, reference.chosen_scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(vectorised.rejected_scores, reference.rejected_scores, atol=1e-6, rtol=0)
    grads = []
    for out in (reference, vectorised):
        values = (batch["chosen_values"], batch["rejected_values"])
        grads.append(torch.autograd.grad(out.loss, values))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.isfinite(vectorised.loss)


def test_hand_computed_example():
    # pair 0: shared prefix [5, 6], chosen length 4, rejected length 3 -> window [2, 4)
    # pair 1: identical -> window [2, 3) (last real token only)
    # pair 2: no shared prefix -> window [0, max(2, 3)) = [0, 3)
    batch = _batch([([5, 6, 7, 8], [5, 6, 9]), ([1, 2, 3], [1, 2, 3]), ([4, 4], [3, 4, 4])], 5)
    cv, rv = batch["chosen_values"], batch["rejected_values"]
    expected = torch.stack(
        [
            -F.logsigmoid(cv[0, 2:4] - rv[0, 2:4]).mean(),
            -F.logsigmoid(cv[1, 2:3] - rv[1, 2:3]).mean(),
            -F.logsigmoid(cv[2, 0:3] - rv[2, 0:3]).mean(),
        ]
    ).mean()
    reference, vectorised = _both(batch)
    assert reference.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert vectorised.loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert vectorised.chosen_scores.tolist() == pytest.approx([cv[0, 3].item(), cv[1, 2].item(), cv[2, 1].item()])
    assert vectorised.rejected_scores.tolist() == pytest.approx([rv[0, 2].item(), rv[1, 2].item(), rv[2, 2].item()])
    divergence, end, _ = tl.divergence_windows(
        batch["chosen_ids"], batch["rejected_ids"], batch["chosen_mask"], batch["rejected_mask"]
    )
    assert divergence.tolist() == [2, 2, 0] and end.tolist() == [4, 3, 3]


def test_padding_contents_never_count_as_a_difference():
    batch = _batch([([1, 2, 3], [1, 2, 3])], 5)
    batch["rejected_ids"][0, 3:] = 77  # a different pad id on one side
    divergence, end, _ = tl.divergence_windows(
        batch["chosen_ids"], batch["rejected_ids"], batch["chosen_mask"], batch["rejected_mask"]
    )
    assert (divergence.item(), end.item()) == (2, 3)
    _assert_same(batch)


pair_strategy = st.integers(min_value=1, max_value=12).flatmap(
    lambda length: st.tuples(
        st.just(length),
        st.lists(
            st.tuples(
                st.sampled_from(["shared", "identical", "no_prefix", "prefix_of_other"]),
                st.integers(0, length),  # shared prefix length
                st.integers(1, length),  # chosen length
                st.integers(1, length),  # rejected length
                st.integers(0, 2**31 - 1),  # token seed
            ),
            min_size=1,
            max_size=6,
        ),
    )
)


def _ids_for(kind, prefix, chosen_length, rejected_length, seed):
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randint(1, 6, (chosen_length,), generator=generator).tolist()  # small vocab: chance matches
    rejected = torch.randint(1, 6, (rejected_length,), generator=generator).tolist()
    if kind == "identical":
        rejected = list(chosen)
    elif kind == "no_prefix":
        rejected[0] = chosen[0] % 5 + 1
    elif kind == "prefix_of_other":  # rejected is a strict prefix of chosen (or equal)
        rejected = chosen[: min(rejected_length, chosen_length)]
    else:
        shared = min(prefix, chosen_length, rejected_length)
        rejected[:shared] = chosen[:shared]
    return chosen, rejected


@settings(max_examples=150, deadline=None)
@given(pair_strategy)
def test_vectorised_matches_reference_on_random_batches(spec):
    length, pairs = spec
    rows = [_ids_for(*pair) for pair in pairs]
    _assert_same(_batch(rows, length))


def test_float32_and_large_random_batch_agree():
    batch = tl.random_pair_batch(16, 64, vocab=7, seed=3)
    reference, vectorised = _both(batch)
    assert abs(reference.loss.item() - vectorised.loss.item()) < 1e-6


def test_input_validation_messages():
    batch = _batch([([1, 2], [1, 3])], 3)
    left = dict(batch, chosen_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="not right-padded"):
        tl.token_level_pairwise_loss(**left)
    with pytest.raises(ValueError, match="not right-padded"):
        tl.token_level_pairwise_loss_reference(**left)
    empty = dict(batch, rejected_mask=torch.tensor([[0, 0, 0]]))
    with pytest.raises(ValueError, match="no real token"):
        tl.token_level_pairwise_loss(**empty)
    short = dict(batch, rejected_values=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="same length"):
        tl.token_level_pairwise_loss(**short)


def _poison_outside_windows(batch, seed):
    """NaN, +inf or -inf at every position outside each pair's window (shared prefix, padding past both ends)."""
    _, _, window = tl.divergence_windows(
        batch["chosen_ids"], batch["rejected_ids"], batch["chosen_mask"], batch["rejected_mask"]
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in ("chosen_values", "rejected_values"):
            values = batch[key]
            specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=values.dtype)
            picks = specials[torch.randint(0, 3, values.shape, generator=generator)]
            values[~window] = picks[~window]
    return batch


@settings(max_examples=100, deadline=None)
@given(pair_strategy, st.integers(0, 2**31 - 1))
def test_nan_and_inf_outside_the_window_give_the_references_gradients(spec, seed):
    # Issue 17: the vectorised loss took -log sigma of every position and masked afterwards, so a NaN in the
    # padding (outside both sequences) made its gradient NaN (0 * NaN) where the loop, which slices the
    # window out, has 0.  Padding values are whatever the model emits there: anything is possible.
    length, pairs = spec
    batch = _poison_outside_windows(_batch([_ids_for(*pair) for pair in pairs], length), seed)
    reference, vectorised = _both(batch)
    assert torch.isfinite(vectorised.loss) and vectorised.loss.item() == pytest.approx(reference.loss.item(), abs=1e-12)
    torch.testing.assert_close(vectorised.chosen_scores, reference.chosen_scores, equal_nan=True)
    torch.testing.assert_close(vectorised.rejected_scores, reference.rejected_scores, equal_nan=True)
    values = (batch["chosen_values"], batch["rejected_values"])
    for a, b in zip(torch.autograd.grad(reference.loss, values), torch.autograd.grad(vectorised.loss, values)):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)  # float64: bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_padding_and_huge_margins_in_low_precision(dtype):
    batch = tl.random_pair_batch(8, 24, vocab=4, seed=2, requires_grad=False)
    for gap in (1.0, 1e4):  # 1e4: every window term is 0 (sigma(1e4) = 1), the sums take the masked form
        batch["chosen_values"] = torch.full((8, 24), gap, dtype=dtype).requires_grad_()
        batch["rejected_values"] = torch.zeros(8, 24, dtype=dtype).requires_grad_()
        _poison_outside_windows(batch, seed=0)
        reference, vectorised = _both(batch)
        assert vectorised.loss.float().item() == pytest.approx(reference.loss.float().item(), rel=1e-2, abs=1e-3)
        values = (batch["chosen_values"], batch["rejected_values"])
        for a, b in zip(torch.autograd.grad(reference.loss, values), torch.autograd.grad(vectorised.loss, values)):
            assert torch.isfinite(b).all() and torch.equal(torch.isfinite(a), torch.isfinite(b))
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-4)


def test_empty_batch_is_one_clear_error_in_both():
    # Issue 17: the vectorised loss returned NaN (a mean over no pairs) and the loop raised a bare
    # RuntimeError from torch.stack([]).
    empty = {key: value[:0] for key, value in _batch([([1, 2], [1, 3])], 3).items()}
    for loss_fn in (tl.token_level_pairwise_loss, tl.token_level_pairwise_loss_reference):
        with pytest.raises(ValueError, match=r"empty batch \(inputs of shape \(0, 3\)\)"):
            loss_fn(**empty)
    no_tokens = {key: value[:, :0] for key, value in _batch([([1, 2], [1, 3])], 3).items()}
    for loss_fn in (tl.token_level_pairwise_loss, tl.token_level_pairwise_loss_reference):
        with pytest.raises(ValueError, match=r"sequences of length 0 \(inputs of shape \(1, 0\)\)"):
            loss_fn(**no_tokens)


def test_negative_ids_take_the_general_path():
    # A real id of -1 looks like padding to _real_ids; the fast divergence search assumes ids >= 0 and hands
    # such batches to divergence_windows, so the two implementations still agree.
    batch = _batch([([5, -1, 7], [5]), ([2, 3], [2, 4]), ([-1, -1], [-1, -1])], 4)
    divergence, end, _ = tl.divergence_windows(
        batch["chosen_ids"], batch["rejected_ids"], batch["chosen_mask"], batch["rejected_mask"]
    )
    assert divergence.tolist() == [2, 1, 1] and end.tolist() == [3, 2, 2]
    _assert_same(batch)


def test_vectorised_gradients_equal_the_loops_bit_for_bit_in_float32():
    # Notebook 03 prints "|loss difference| 0.0e+00, max |gradient difference| 0.0e+00" for this batch.
    batch = tl.random_pair_batch(batch=64, length=128, seed=0)
    reference, vectorised = _both(batch)
    assert torch.equal(reference.loss, vectorised.loss)
    for key in ("chosen_values", "rejected_values"):
        (a,) = torch.autograd.grad(reference.loss, batch[key], retain_graph=True)
        (b,) = torch.autograd.grad(vectorised.loss, batch[key], retain_graph=True)
        assert torch.equal(a, b)


def test_vectorised_loss_makes_the_same_torch_calls_at_any_batch_size():
    # Its speed comes from a fixed number of whole-batch operations (no loop over pairs): count them.
    counts = {}
    for loss_fn in (tl.token_level_pairwise_loss, tl.token_level_pairwise_loss_reference):
        for size in (2, 32):
            batch = tl.random_pair_batch(size, 64, seed=size)
            counts[loss_fn.__name__, size] = benchmarks.forward_torch_calls(loss_fn, batch)
    assert counts["token_level_pairwise_loss", 2] == counts["token_level_pairwise_loss", 32] < 100
    assert counts["token_level_pairwise_loss_reference", 32] > 10 * counts["token_level_pairwise_loss", 32]


def test_loss_trains_values_apart():
    batch = tl.random_pair_batch(4, 10, vocab=5, seed=0)
    loss = tl.token_level_pairwise_loss(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert (batch["chosen_values"].grad <= 0).all() and (batch["chosen_values"].grad < 0).any()


def test_benchmark_prints_a_ratio(capsys):
    benchmarks.benchmark_token_loss(["--batch", "4", "--length", "16", "--repeats", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "speed-up" in out and "threads=1" in out
    reference_calls, vectorised_calls = (int(n) for n in re.search(r"reference (\d+), vectorised (\d+)", out).groups())
    assert reference_calls > vectorised_calls > 0  # 4 pairs: the loop already makes more calls


def test_movie_preference_pairs_share_a_prompt_and_differ():
    pairs = tl.movie_preference_pairs(max_pairs=50, seed=0)
    again = tl.movie_preference_pairs(max_pairs=50, seed=0)
    assert pairs == again and len(pairs) == 50
    assert len({p["movie"] for p in pairs}) == 50  # round-robin: one pair per movie first
    for pair in pairs:
        assert pair["prompt"].startswith("Critic review of ") and pair["chosen"] != pair["rejected"]


def test_tokenize_pair_tensors_right_pads_both_sides_to_one_length():
    from rlhf_course.core import assets

    tokenizer = assets.gpt2_tokenizer()
    pairs = [{"prompt": "Critic review of Up:", "chosen": " Lovely.", "rejected": " A long and tedious mess of a film."},
             {"prompt": "Critic review of Heat:", "chosen": " Superb and tense.", "rejected": " Dull."}]
    batch = tl.tokenize_pair_tensors(pairs, tokenizer, max_length=32)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: tuple(batch["chosen_ids"].shape) for k in batch}
    divergence, _, _ = tl.divergence_windows(**batch)
    prompt_lengths = [len(tokenizer(p["prompt"])["input_ids"]) for p in pairs]
    assert divergence.tolist() == prompt_lengths
    trimmed = tl.trim_padding({k: torch.nn.functional.pad(v, (0, 3)) for k, v in batch.items()})
    assert trimmed["chosen_ids"].shape == batch["chosen_ids"].shape
    with pytest.raises(ValueError, match="lacks"):
        tl.tokenize_pair_tensors([{"prompt": "x", "chosen": "y"}], tokenizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_loss_finite_with_huge_values_in_every_dtype(dtype):
    batch = tl.random_pair_batch(4, 12, vocab=5, seed=1, requires_grad=False)
    batch["chosen_values"] = torch.full((4, 12), -1e4, dtype=dtype, requires_grad=True)
    batch["rejected_values"] = torch.full((4, 12), 1e4, dtype=dtype, requires_grad=True)
    for loss_fn in (tl.token_level_pairwise_loss, tl.token_level_pairwise_loss_reference):
        loss = loss_fn(**batch).loss
        (grad,) = torch.autograd.grad(loss, batch["chosen_values"])
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert loss.float().item() == pytest.approx(2e4, rel=1e-2)


@pytest.mark.parametrize("seq_len", [6, 5000])  # 5000: past float32's exact position sums, checked in float64
def test_masks_of_any_dtype_are_checked_not_truncated(seq_len):
    batch = tl.random_pair_batch(3, seq_len, vocab=9, seed=4)
    expected = tl.token_level_pairwise_loss(**batch).loss
    for cast in (torch.bool, torch.int32, torch.float32):
        same = dict(batch, chosen_mask=batch["chosen_mask"].to(cast), rejected_mask=batch["rejected_mask"].to(cast))
        assert torch.equal(tl.token_level_pairwise_loss(**same).loss, expected)
    # A fraction used to be truncated to 0 by .long(): [1, ..., 1, 0.5, 0, ...] passed as a row one token shorter.
    fractional = batch["rejected_mask"].float()
    fractional[1, int(fractional[1].sum()) - 1] = 0.5
    with pytest.raises(ValueError, match=r"rejected_mask row 1 is not right-padded .* 0/1 values"):
        tl.token_level_pairwise_loss(**dict(batch, rejected_mask=fractional))
    gap = batch["chosen_mask"].clone()
    gap[2, 0] = 0  # a hole at the start: same count of ones, wrong positions
    with pytest.raises(ValueError, match="chosen_mask row 2 is not right-padded"):
        tl.token_level_pairwise_loss_reference(**dict(batch, chosen_mask=gap))
