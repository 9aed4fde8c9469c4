"""Reconstruction math (OBS pruning, GPTQ assignment, codebook refit, bias correction) against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from eiec.passes import reconstruct
from eiec.passes.compress import quantize_weights
from eiec.passes.compress import top_k_mask
from eiec.passes.reconstruct import (
    LayerTarget,
    _gptq_masked,
    _gptq_shared,
    bias_correction,
    gptq_assign,
    greedy_prune,
    input_mean,
    kept_count,
    layer_error,
    layer_hessian,
    nearest_assign,
    obs_prune,
    refit_codebook,
)


def correlated_inputs(rng: np.random.Generator, n: int, n_in: int, rank: int = 8) -> np.ndarray:
    """Calibration rows whose inputs are strongly correlated (low rank plus noise), as in real layers."""
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, n_in)) + 0.3 * rng.standard_normal((n, n_in))


def magnitude_prune(W: np.ndarray, density: float) -> np.ndarray:
    """The obvious oracle: keep the k largest |w| of the layer."""
    k = kept_count(W.size, density)
    keep = np.zeros(W.size, bool)
    keep[np.argsort(-np.abs(W), axis=None, kind="stable")[:k]] = True
    return np.where(keep.reshape(W.shape), W, 0.0)


def output_error(W_ref: np.ndarray, W_new: np.ndarray, X: np.ndarray) -> float:
    """Relative output MSE computed the slow way, through the outputs themselves."""
    return float(np.sum((X @ (W_ref - W_new).T) ** 2) / np.sum((X @ W_ref.T) ** 2))


def random_codebook_layer(rng: np.random.Generator, out: int, n_in: int, bits: int, density: float):
    W = rng.standard_normal((out, n_in))
    K = 1 << bits
    indices = np.where(rng.random((out, n_in)) < density, rng.integers(1, K, (out, n_in)), 0).astype(np.uint8)
    codebook = np.concatenate([[0.0], np.sort(rng.standard_normal(K - 1))]).astype(np.float32)
    return W, indices, codebook


def test_layer_hessian_is_xtx_over_n():
    X = np.random.default_rng(0).standard_normal((50, 7))
    np.testing.assert_allclose(layer_hessian(X), X.T @ X / 50)
    Xg = np.stack([X, 2 * X])
    np.testing.assert_allclose(layer_hessian(Xg)[1], 4 * X.T @ X / 50)


def test_layer_error_equals_relative_output_mse():
    rng = np.random.default_rng(1)
    X = correlated_inputs(rng, 200, 30)
    W = rng.standard_normal((12, 30))
    W_new = W + 0.1 * rng.standard_normal(W.shape)
    assert layer_error(W, W_new, layer_hessian(X)) == pytest.approx(output_error(W, W_new, X), rel=1e-10)


def test_grouped_layer_error_equals_block_diagonal_layer():
    rng = np.random.default_rng(2)
    g, out_g, n_in = 3, 4, 5
    X = rng.standard_normal((g, 40, n_in))
    W = rng.standard_normal((g * out_g, n_in))
    W_new = W * (rng.random(W.shape) < 0.5)
    # The same conv as one dense layer: block-diagonal weights over all groups' inputs.
    big = scipy.linalg.block_diag(*[W[i * out_g : (i + 1) * out_g] for i in range(g)])
    big_new = scipy.linalg.block_diag(*[W_new[i * out_g : (i + 1) * out_g] for i in range(g)])
    X_all = np.concatenate(list(X), axis=1)
    assert layer_error(W, W_new, layer_hessian(X)) == pytest.approx(output_error(big, big_new, X_all), rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.8])
def test_obs_prune_beats_magnitude_pruning_at_same_density(seed, density):
    rng = np.random.default_rng(seed)
    X = correlated_inputs(rng, 400, 96)
    W = rng.standard_normal((32, 96))
    H = layer_hessian(X)
    W_obs = obs_prune(W, H, density)
    W_mag = magnitude_prune(W, density)
    assert np.count_nonzero(W_obs) == np.count_nonzero(W_mag) == kept_count(W.size, density)
    assert output_error(W, W_obs, X) < output_error(W, W_mag, X)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 12),
    n_in=st.integers(1, 40),
    groups=st.sampled_from([1, 2, 3]),
    density=st.floats(0.01, 1.0),
    dead=st.integers(0, 5),
    zeros=st.floats(0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_obs_prune_keeps_exactly_k_nonzeros_and_never_loses_to_magnitude(out, n_in, groups, density, dead, zeros, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((groups, 30, n_in))
    X[:, :, : min(dead, n_in)] = 0  # dead inputs: H_jj == 0
    W = rng.standard_normal((out * groups, n_in)) * (rng.random((out * groups, n_in)) >= zeros)
    H = layer_hessian(X if groups > 1 else X[0])
    W_new = obs_prune(W, H, density, block=7)
    k = kept_count(W.size, density)
    assert layer_error(W, W_new, H) <= layer_error(W, magnitude_prune(W, density), H) * (1 + 1e-12)
    if np.count_nonzero(W) >= k:
        assert np.count_nonzero(W_new) == k
    else:  # pruning never needs to invent weights; OBS updates may still fill some zeros
        assert np.count_nonzero(W_new) <= k
    assert np.all(np.isfinite(W_new))


def greedy_oracle(W: np.ndarray, H: np.ndarray, counts: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Orthogonal matching pursuit row by row, the plain way: the gradient H (w - v) recomputed
    and the chosen weights' damped normal equations solved afresh at every step (H [in, in])."""
    n_in = H.shape[0]
    d = np.diag(H)
    live = d > 0
    Hd = H + damp * (d[live].mean() if live.any() else 1.0) * np.eye(n_in)
    V = np.zeros(W.shape)
    for r in range(W.shape[0]):
        w, v, S = W[r].astype(np.float64), np.zeros(n_in), []
        for _ in range(min(int(counts[r]), n_in)):
            g = H @ (w - v)
            score = np.array([-2.0 if j in S else (g[j] ** 2 / d[j] if live[j] else -1.0) for j in range(n_in)])
            S.append(int(np.argmax(score)))
            v = np.zeros(n_in)
            v[S] = np.linalg.solve(Hd[np.ix_(S, S)], (H @ w)[S])
        dead = [j for j in S if not live[j]]
        v[dead] = w[dead]
        V[r] = v
    return V


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("seed", range(3))
def test_greedy_prune_equals_the_row_by_row_matching_pursuit(seed, groups, monkeypatch):
    rng = np.random.default_rng(seed)
    X = np.stack([correlated_inputs(rng, 50, 24, rank=4) for _ in range(groups)])
    X[:, :, [3, 17]] = 0  # dead inputs: chosen last, keeping W's value
    W = rng.standard_normal((5 * groups, 24))
    counts = rng.integers(0, 30, 5 * groups)  # none, some, and more than the inputs (all of them)
    H = layer_hessian(X if groups > 1 else X[0])
    Hg = H if groups > 1 else H[None]
    oracle = np.concatenate([greedy_oracle(W[i * 5:(i + 1) * 5], Hg[i], counts[i * 5:(i + 1) * 5])
                             for i in range(groups)])
    np.testing.assert_allclose(greedy_prune(W, H, counts), oracle, rtol=1e-9, atol=1e-12)
    # rows in chunks of one: the same answer
    monkeypatch.setattr(reconstruct, "GREEDY_CHUNK_BYTES", 1)
    np.testing.assert_allclose(greedy_prune(W, H, counts), oracle, rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 6), n_in=st.integers(1, 30), k=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_greedy_prune_keeps_each_rows_count_at_the_least_squares_optimum_of_its_support(out, n_in, k, seed):
    rng = np.random.default_rng(seed)
    X = correlated_inputs(rng, 40, n_in, rank=3)
    H = layer_hessian(X)
    W = rng.standard_normal((out, n_in))
    counts = np.minimum(rng.integers(0, k + 1, out), n_in)
    V = greedy_prune(W, H, counts)
    Hd = H + 0.01 * np.diag(H).mean() * np.eye(n_in)
    for r in range(out):
        S = np.flatnonzero(V[r])
        assert S.size <= counts[r]
        # the chosen weights solve the damped normal equations on their support
        np.testing.assert_allclose(Hd[np.ix_(S, S)] @ V[r, S], (H @ W[r])[S], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_greedy_prune_beats_obs_when_inputs_span_few_directions(seed):
    """The digits' 784 inputs are 64 pixels upsampled: every input row lies in a 64-dimensional
    subspace. A few well-chosen weights per row then reproduce the layer; OBS's one sweep does not find them."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 150))  # rank 12, no noise
    H = layer_hessian(X)
    W = rng.standard_normal((20, 150))
    W_obs = obs_prune(W, H, 0.06)
    W_greedy = greedy_prune(W, H, (W_obs != 0).sum(axis=1))
    assert np.array_equal((W_greedy != 0).sum(axis=1), (W_obs != 0).sum(axis=1))
    assert layer_error(W, W_greedy, H) < 0.5 * layer_error(W, W_obs, H)


def test_greedy_is_tried_on_a_large_layer_only_where_its_sample_rows_come_closer(monkeypatch):
    """Inputs in 12 directions: the greedy mask's sample rows beat OBS's, so it is built. Isotropic
    inputs (H = I): OBS keeps each row's largest weights, already the closest, and greedy can only tie."""
    monkeypatch.setattr(reconstruct, "GREEDY_SAMPLE_ROWS", 8)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 150))
    for H, promising in ((layer_hessian(X), True), (np.eye(150), False), (np.eye(150)[None], False)):
        W = rng.standard_normal((40, 150))
        W_obs = obs_prune(W, H, 0.06)
        assert reconstruct.greedy_promising(W, H, W_obs, (W_obs != 0).sum(axis=1)) is promising
    # a layer of at most twice the sample's rows is not sampled
    assert reconstruct.greedy_promising(W[:16], np.eye(150), W_obs[:16], (W_obs[:16] != 0).sum(axis=1))


def test_obs_prune_keeps_dead_input_weights_only_as_a_last_resort():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((100, 10))
    X[:, 0] = 0
    W = rng.standard_normal((6, 10))
    W[:, 0] = 100.0  # huge, but its input is always zero: worthless
    W_new = obs_prune(W, layer_hessian(X), 0.5)
    assert np.all(W_new[:, 0] == 0)
    assert np.count_nonzero(W_new) == 30


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 10),
    n_in=st.integers(1, 30),
    n=st.integers(1, 60),
    bits=st.integers(1, 4),
    density=st.floats(0.0, 1.0),
    dead=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_refit_codebook_never_increases_layer_error(out, n_in, n, bits, density, dead, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in))
    X[:, : min(dead, n_in)] = 0
    W, indices, codebook = random_codebook_layer(rng, out, n_in, bits, density)
    H = layer_hessian(X)
    for new in (refit_codebook(W, indices, codebook, H), refit_codebook(W, indices, codebook, H, X=X)):
        assert new[0] == 0.0 and new.dtype == codebook.dtype and new.shape == codebook.shape
        before = output_error(W, codebook[indices].astype(np.float64), X) if np.any(X @ W.T) else 0.0
        after = output_error(W, new[indices].astype(np.float64), X) if np.any(X @ W.T) else 0.0
        assert after <= before * (1 + 1e-9) + 1e-15


def test_refit_codebook_is_the_least_squares_solution():
    rng = np.random.default_rng(4)
    X = correlated_inputs(rng, 300, 24)
    W, indices, codebook = random_codebook_layer(rng, 16, 24, 3, 0.6)
    codebook = codebook.astype(np.float64)
    new = refit_codebook(W, indices, codebook, layer_hessian(X))
    # Oracle: outputs are linear in the codebook; one design column per nonzero entry.
    design = np.stack([(X @ (indices == k).T).ravel() for k in range(1, 8)], axis=1)
    c = np.linalg.lstsq(design, (X @ W.T).ravel(), rcond=None)[0]
    np.testing.assert_allclose(new[1:], c, rtol=1e-7, atol=1e-9)
    assert layer_error(W, new[indices], layer_hessian(X)) < layer_error(W, codebook[indices], layer_hessian(X))


def test_refit_codebook_through_x_equals_through_h():
    rng = np.random.default_rng(5)
    X = correlated_inputs(rng, 20, 64)  # fewer rows than inputs: the X path is taken
    W, indices, codebook = random_codebook_layer(rng, 10, 64, 4, 0.3)
    codebook = codebook.astype(np.float64)
    H = layer_hessian(X)
    np.testing.assert_allclose(refit_codebook(W, indices, codebook, H, X=X), refit_codebook(W, indices, codebook, H), rtol=1e-8, atol=1e-10)


def test_refit_codebook_grouped_equals_block_diagonal_layer():
    rng = np.random.default_rng(6)
    g, out_g, n_in = 2, 5, 9
    X = rng.standard_normal((g, 80, n_in))
    W, indices, codebook = random_codebook_layer(rng, g * out_g, n_in, 3, 0.7)
    codebook = codebook.astype(np.float64)
    new = refit_codebook(W, indices, codebook, layer_hessian(X))
    big = scipy.linalg.block_diag(*[W[i * out_g : (i + 1) * out_g] for i in range(g)])
    big_idx = scipy.linalg.block_diag(*[indices[i * out_g : (i + 1) * out_g] for i in range(g)]).astype(np.uint8)
    X_all = np.concatenate(list(X), axis=1)
    np.testing.assert_allclose(new, refit_codebook(big, big_idx, codebook, layer_hessian(X_all)), rtol=1e-8, atol=1e-10)


def test_refit_codebook_returns_original_when_already_optimal():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((100, 12))
    W, indices, codebook = random_codebook_layer(rng, 8, 12, 2, 0.8)
    codebook = codebook.astype(np.float64)
    H = layer_hessian(X)
    once = refit_codebook(W, indices, codebook, H)
    np.testing.assert_array_equal(refit_codebook(W, indices, once, H), once)


def test_bias_correction_restores_mean_output():
    rng = np.random.default_rng(8)
    X = correlated_inputs(rng, 500, 20) + 2.0  # nonzero mean inputs: pruning shifts the outputs
    W = rng.standard_normal((7, 20))
    b = rng.standard_normal(7)
    W_new = magnitude_prune(W, 0.3)
    delta = bias_correction(W, W_new, input_mean(X))
    np.testing.assert_allclose((X @ W_new.T + b + delta).mean(axis=0), (X @ W.T + b).mean(axis=0), atol=1e-10)


def test_bias_correction_grouped():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((3, 100, 6)) + 1.0
    W = rng.standard_normal((6, 6))
    W_new = magnitude_prune(W, 0.4)
    delta = bias_correction(W, W_new, input_mean(X))
    for i in range(3):
        rows = slice(2 * i, 2 * i + 2)
        np.testing.assert_allclose((X[i] @ W_new[rows].T + delta[rows]).mean(0), (X[i] @ W[rows].T).mean(0), atol=1e-10)


def nearest_oracle(W: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """argmin |w - c| over entries 1..K-1 (sorted by k-means, so the lowest index wins a tie); 0 for zeros."""
    c = codebook.astype(np.float64)
    d = np.abs(W[..., None] - c[None, None, 1:])
    return np.where(W != 0, 1 + np.argmin(d, axis=-1), 0)


def obq_oracle(W: np.ndarray, H: np.ndarray, codebook: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Textbook OBQ/GPTQ, one row and one column at a time, with explicit H^-1 downdates (no Cholesky)."""
    n_in = H.shape[0]
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(n_in)
    c = codebook.astype(np.float64)
    idx = np.zeros(W.shape, np.int64)
    for r in range(W.shape[0]):
        w = W[r].astype(np.float64).copy()
        Hinv = np.linalg.inv(Hd)
        for j in range(n_in):
            code = 0 if W[r, j] == 0 else 1 + int(np.argmin(np.abs(w[j] - c[1:])))
            err = (w[j] - c[code]) / Hinv[j, j]
            w -= err * Hinv[j]  # the OBS update of the not-yet-quantized weights
            Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]  # remove input j
            idx[r, j] = code
    return idx


def pruned_layer(rng: np.random.Generator, out: int, n_in: int, density: float) -> np.ndarray:
    W = rng.standard_normal((out, n_in)).astype(np.float32)
    return magnitude_prune(W, density).astype(np.float32).astype(np.float64)


def masked_obq_oracle(W: np.ndarray, H: np.ndarray, codebook: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """OBQ with the mask fixed, row by row: the textbook loop on the row's kept inputs only."""
    n_in = H.shape[0]
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(n_in)
    idx = np.zeros(W.shape, np.int64)
    for r in range(W.shape[0]):
        S = np.flatnonzero(W[r])
        if S.size:
            # obq_oracle damps its H again: hand it H_SS undamped plus the same absolute damping
            sub = Hd[np.ix_(S, S)]
            idx[r, S] = obq_oracle(W[r : r + 1, S], sub, codebook, damp=0.0)[0]
    return idx


@pytest.mark.parametrize("seed", range(3))
def test_gptq_passes_equal_the_textbook_obq_loops(seed):
    rng = np.random.default_rng(seed)
    X = correlated_inputs(rng, 300, 40)
    H = layer_hessian(X)
    W = pruned_layer(rng, 9, 40, 0.4)
    codebook, _ = quantize_weights(W.astype(np.float32), 3)
    oracle = obq_oracle(W, H, codebook)
    np.testing.assert_array_equal(_gptq_shared(W, H, codebook.astype(np.float64), 7, 0.01), oracle)
    np.testing.assert_array_equal(_gptq_shared(W, H, codebook.astype(np.float64), 64, 0.01), oracle)
    masked = masked_obq_oracle(W, H, codebook)
    np.testing.assert_array_equal(_gptq_masked(W, H, codebook.astype(np.float64), 0.01), masked)
    np.testing.assert_array_equal(_gptq_masked(W, H, codebook.astype(np.float64), 0.01, chunk_bytes=1), masked)
    e = {k: layer_error(W, codebook[v].astype(np.float64), H)
         for k, v in (("shared", oracle), ("masked", masked), ("nearest", nearest_oracle(W, codebook)))}
    assert layer_error(W, codebook[gptq_assign(W, H, codebook)].astype(np.float64), H) == pytest.approx(min(e.values()))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits", [3, 4])  # at 2 bits (3 levels) the greedy order often cannot win
def test_gptq_assign_beats_nearest_centroid_on_correlated_inputs(seed, bits):
    rng = np.random.default_rng(10 + seed)
    X = correlated_inputs(rng, 400, 96)
    H = layer_hessian(X)
    W = pruned_layer(rng, 32, 96, 0.3)
    codebook, indices = quantize_weights(W.astype(np.float32), bits)
    idx = gptq_assign(W, H, codebook)
    assert output_error(W, codebook[idx].astype(np.float64), X) < 0.8 * output_error(
        W, codebook[indices].astype(np.float64), X)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 10),
    n_in=st.integers(1, 40),
    groups=st.sampled_from([1, 2, 3]),
    density=st.floats(0.01, 1.0),
    bits=st.integers(1, 4),
    dead=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_gptq_assign_keeps_the_mask_and_never_loses_to_nearest(out, n_in, groups, density, bits, dead, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((groups, 40, 4)) @ rng.standard_normal((4, n_in)) + 0.2 * rng.standard_normal((groups, 40, n_in))
    X[:, :, : min(dead, n_in)] = 0  # dead inputs: H_jj == 0
    H = layer_hessian(X if groups > 1 else X[0])
    W = pruned_layer(rng, out * groups, n_in, density)
    codebook, indices = quantize_weights(W.astype(np.float32), bits)
    np.testing.assert_array_equal(nearest_assign(W, codebook), nearest_oracle(W, codebook))
    np.testing.assert_array_equal(nearest_assign(W, codebook), indices)  # k-means' own assignment
    idx = gptq_assign(W, H, codebook, block=5)
    assert idx.dtype == np.uint8 and idx.shape == W.shape
    assert np.array_equal(idx == 0, W == 0)  # pruned weights: entry 0; kept ones: never entry 0
    assert idx.max() < 1 << bits
    e_near = layer_error(W, codebook[indices].astype(np.float64), H)
    assert layer_error(W, codebook[idx].astype(np.float64), H) <= e_near * (1 + 1e-12) + 1e-300


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(-1, 65), levels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_top_k_mask_picks_what_a_stable_descending_sort_picks(n, k, levels, seed):
    key = np.random.default_rng(seed).integers(0, levels, n).astype(np.float64)  # many ties
    want = np.zeros(n, bool)
    want[np.argsort(-key, kind="stable")[: max(k, 0)]] = True
    np.testing.assert_array_equal(top_k_mask(key, k), want)


def test_sweeps_across_lazy_stretches_equal_the_textbook_loop(monkeypatch):
    # stretches of 14 columns with blocks of 7: updates cross stretch boundaries by the outer GEMM
    monkeypatch.setattr(reconstruct, "LAZY_COLUMNS", 14)
    rng = np.random.default_rng(11)
    X = correlated_inputs(rng, 300, 40)
    H = layer_hessian(X)
    W = pruned_layer(rng, 9, 40, 0.4)
    codebook, _ = quantize_weights(W.astype(np.float32), 3)
    np.testing.assert_array_equal(_gptq_shared(W, H, codebook.astype(np.float64), 7, 0.01), obq_oracle(W, H, codebook))
    W_dense = rng.standard_normal((9, 40))
    monkeypatch.setattr(reconstruct, "LAZY_COLUMNS", 1 << 20)  # one stretch: the update after every block
    one = obs_prune(W_dense, H, 0.3, block=7)
    monkeypatch.setattr(reconstruct, "LAZY_COLUMNS", 14)
    np.testing.assert_allclose(obs_prune(W_dense, H, 0.3, block=7), one, rtol=1e-9, atol=1e-12)


def test_float32_sweeps_agree_with_float64_up_to_rounding():
    rng = np.random.default_rng(12)
    X = correlated_inputs(rng, 400, 96)
    H = layer_hessian(X)
    W = rng.standard_normal((48, 96))
    W32 = W.astype(np.float32)
    P64, P32 = obs_prune(W32.astype(np.float64), H, 0.3), obs_prune(W32, H, 0.3)
    assert P32.dtype == np.float32
    assert np.mean((P64 != 0) == (P32 != 0)) > 0.99  # the same mask but for near-ties
    e64, e32 = layer_error(W, P64, H), layer_error(W, P32.astype(np.float64), H)
    assert e32 == pytest.approx(e64, rel=0.02)
    P = pruned_layer(rng, 48, 96, 0.3)
    codebook, _ = quantize_weights(P.astype(np.float32), 4)
    c = codebook.astype(np.float64)
    i64, i32 = _gptq_shared(P, H, c, 16, 0.01), _gptq_shared(P.astype(np.float32), H, c, 16, 0.01)
    assert np.mean(i64 == i32) > 0.99
    assert layer_error(P, c[i32], H) == pytest.approx(layer_error(P, c[i64], H), rel=0.02)


@pytest.mark.parametrize("n", [30, 200])  # fewer rows than inputs (through X) and more (through H)
@pytest.mark.parametrize("groups", [1, 2])
def test_layer_target_errors_optimum_and_refit_match_the_outputs(n, groups):
    rng = np.random.default_rng(13)
    n_in, out_g = 64, 5
    X_ref = rng.standard_normal((groups, n, n_in))
    X = X_ref + 0.1 * rng.standard_normal(X_ref.shape)
    W = rng.standard_normal((groups * out_g, n_in))
    sq = (lambda a: a[0]) if groups == 1 else (lambda a: a)
    t = LayerTarget(W, sq(X), sq(X_ref))
    assert t.via_x == (n < n_in)
    Wg = W.reshape(groups, out_g, n_in)
    y_ref = X_ref @ np.swapaxes(Wg, 1, 2)

    def oracle(W_new, db=np.zeros(groups * out_g)):  # through the outputs themselves
        y = X @ np.swapaxes(W_new.reshape(Wg.shape), 1, 2) + np.reshape(db, (groups, 1, out_g))
        return float(np.sum((y - y_ref) ** 2) / np.sum(y_ref**2))

    W_new = magnitude_prune(W, 0.4)
    db = rng.standard_normal(groups * out_g)
    assert t.error(W_new) == pytest.approx(oracle(W_new), rel=1e-9)
    assert t.error(W_new, db) == pytest.approx(oracle(W_new, db), rel=1e-9)
    # the optimum: the least squares weights with the damping OBS uses, from the normal equations
    H = layer_hessian(X)  # [groups, in, in]
    lam = 0.01 * np.diagonal(H, axis1=1, axis2=2).mean(axis=1)
    rhs = np.swapaxes(X, 1, 2) @ y_ref / n + lam[:, None, None] * np.swapaxes(Wg, 1, 2)
    want = np.stack([np.linalg.solve(H[i] + lam[i] * np.eye(n_in), rhs[i]).T for i in range(groups)])
    np.testing.assert_allclose(t.optimum(), want.reshape(W.shape), rtol=1e-7, atol=1e-9)
    # the refit lowers the error as measured through the outputs
    idx = np.where(W_new != 0, 1 + (W_new > 0), 0).astype(np.uint8)
    codebook = np.array([0.0, -1.0, 1.0], np.float32)
    new = t.refit(idx, codebook)
    assert oracle(new[idx].astype(np.float64)) <= oracle(codebook[idx].astype(np.float64))
    np.testing.assert_allclose(t.bias_correction(new[idx]),
                               -(X @ np.swapaxes(new[idx].reshape(Wg.shape), 1, 2) - y_ref).mean(axis=1).reshape(-1),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_large_layer_paths_equal_the_plain_ones(monkeypatch, groups):
    # dead inputs (zero columns of X, one group wholly dead) left out of the Cholesky factors and
    # the least-squares solve give the same factor, optimum and errors up to rounding; the refit's
    # float32 sparse product the same codebook
    rng = np.random.default_rng(7)
    n, n_in, out_g = 300, 40, 6
    X_ref = np.stack([correlated_inputs(rng, n, n_in) for _ in range(groups)])
    X_ref[:, :, [3, 17, 18, 39]] = 0.0
    if groups > 1:
        X_ref[1] = 0.0
    X = np.where(X_ref != 0, X_ref + 0.1 * rng.standard_normal(X_ref.shape), 0.0)
    W = rng.standard_normal((groups * out_g, n_in))
    sq = (lambda a: a[0]) if groups == 1 else (lambda a: a)
    W_new = magnitude_prune(W, 0.4)
    idx = np.where(W_new != 0, 1 + (W_new > 0), 0).astype(np.uint8)
    codebook = np.array([0.0, -1.0, 1.0], np.float32)
    f32 = lambda a: a.astype(np.float32)  # float32 layers' refit takes the float32 sparse product
    whole = LayerTarget(W, sq(X), sq(X_ref))
    U_whole, live_whole = whole.factor()
    refit_whole = LayerTarget(f32(W), sq(f32(X)), sq(f32(X_ref))).refit(idx, codebook)
    monkeypatch.setattr(reconstruct, "LARGE_INPUTS", 1)
    np.testing.assert_allclose(LayerTarget(f32(W), sq(f32(X)), sq(f32(X_ref))).refit(idx, codebook), refit_whole,
                               rtol=1e-5)
    live_block = LayerTarget(W, sq(X), sq(X_ref))
    U, live = live_block.factor()
    np.testing.assert_array_equal(live, live_whole)
    np.testing.assert_allclose(U, U_whole, rtol=1e-9, atol=1e-12)
    # the optimum through OBS's factor: the normal equations on the live inputs, with OBS's damping
    # (the live inputs' mean diagonal); a dead input's weight keeps its dense value
    H, R = live_block.H, live_block.R
    want = W.reshape(groups, out_g, n_in).copy()
    for i in range(groups):
        keep = np.flatnonzero(live[i])
        lam = 0.01 * (np.diagonal(H[i])[keep].mean() if keep.size else 1.0)
        if keep.size:
            want[i][:, keep] -= np.linalg.solve(H[i][np.ix_(keep, keep)] + lam * np.eye(keep.size), R[i][keep]).T
    np.testing.assert_allclose(live_block.optimum(), want.reshape(W.shape), rtol=1e-9, atol=1e-12)
    assert live_block.error(W_new) == pytest.approx(whole.error(W_new), rel=1e-12)
    assert live_block.error(W_new.astype(np.float32)) == live_block.error(W_new.astype(np.float32).astype(np.float64))
    # a large float32 layer's errors (and their denominator) take float32 products with H
    t32 = LayerTarget(f32(W), sq(f32(X)), sq(f32(X_ref)))
    assert t32._H_products.dtype == np.float32
    assert t32.error(W_new) == pytest.approx(whole.error(W_new), rel=1e-4)
    assert t32.energy == pytest.approx(whole.energy, rel=1e-4)
    # ... and its factor of H^-1 in float32 (LAPACK's spotrf), the optimum through it
    U32, live32 = t32.factor()
    assert U32.dtype == np.float32
    np.testing.assert_array_equal(live32, live_whole)
    np.testing.assert_allclose(U32, U_whole, rtol=1e-3, atol=1e-4 * np.abs(U_whole).max())
    np.testing.assert_allclose(t32.optimum(), whole.optimum(), rtol=1e-3, atol=1e-4 * np.abs(W).max())


def test_float32_factor_is_the_float64_one_and_refuses_an_indefinite_matrix():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((50, 20))
    H = (A.T @ A)[None]
    U64 = reconstruct._upper_inverse_factor(H)
    U32 = reconstruct._upper_inverse_factor(H.astype(np.float32))
    assert U32.dtype == np.float32 and np.allclose(np.triu(U32), U32)
    np.testing.assert_allclose(U32, U64, rtol=1e-3, atol=1e-5 * np.abs(U64).max())
    np.testing.assert_allclose(U64[0].T @ U64[0], np.linalg.inv(H[0]), rtol=1e-8, atol=1e-12)
    with pytest.raises(np.linalg.LinAlgError):
        reconstruct._upper_inverse_factor(-H.astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 12), n_in=st.integers(1, 30), k=st.integers(2, 16), density=st.sampled_from([0.0, 0.3, 1.0]),
       grid=st.booleans(), fortran=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_nearest_assign_is_the_nearest_nonzero_entry_of_each_kept_weight(out, n_in, k, density, grid, fortran, seed):
    # the obvious oracle, one weight at a time in float64: the nearest of entries 1..K-1 (distinct,
    # as k-means leaves them), a tie to the smaller value (grid: weights and entries on a coarse
    # grid, so ties happen); zeros get 0
    rng = np.random.default_rng(seed)
    if grid:
        codebook = np.r_[0.0, rng.choice(np.arange(-8, 9) / 4, k - 1, replace=False)]
        W = rng.choice(np.arange(-12, 13) / 8, (out, n_in))
    else:
        codebook = np.r_[0.0, rng.standard_normal(k - 1)]
        W = rng.standard_normal((out, n_in))
    W = np.where(rng.random(W.shape) < density, W, 0.0).astype(rng.choice([np.float32, np.float64]))
    W = np.asfortranarray(W) if fortran else W
    want = np.zeros(W.shape, np.uint8)
    for (r, c), w in np.ndenumerate(W):
        if w != 0:
            dist = [(abs(float(w) - codebook[j]), codebook[j], j) for j in range(1, k)]
            want[r, c] = min(dist)[2]
    np.testing.assert_array_equal(nearest_assign(W, codebook), want)


def test_a_candidate_is_measured_once_whatever_its_dtype_and_the_same_in_either_layout():
    # the error memo: float32 values are one candidate held as float32 or float64; a Fortran-ordered
    # copy gives the same error, to the bit (measured again: its bytes differ); values float32
    # cannot hold are a candidate of their own
    rng = np.random.default_rng(5)
    X_ref = correlated_inputs(rng, 200, 24).astype(np.float32)
    X = X_ref + np.float32(0.1) * rng.standard_normal(X_ref.shape).astype(np.float32)
    W = rng.standard_normal((10, 24)).astype(np.float32)
    t = LayerTarget(W, X, X_ref)
    W_new = magnitude_prune(W, 0.5).astype(np.float32)
    e = t.error(W_new)
    assert t.error(W_new.astype(np.float64)) == e and len(t._weight_errors) == 1
    assert t.error(np.asfortranarray(W_new)) == e and len(t._weight_errors) == 2
    nudged = W_new.astype(np.float64) + 1e-12 * (W_new != 0)
    assert t.error(nudged) != e and len(t._weight_errors) == 3
    assert t.error(W_new.astype(np.float64)[:, ::-1][:, ::-1]) == e and len(t._weight_errors) == 3
