"""Merge operators (deltatune.merge.ops) against mergekit's own code, the papers' properties, and bad input.

mergekit is the oracle only: each case runs mergekit's registered method through its public
``merge_tensors`` (TensorGroup -> GroupMergeMethod/BatchedMergeMethod), the same code its CLI runs.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods.api import merge_tensors
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
from mergekit.sparsify import SparsificationMethod

from deltatune.merge import ops
from deltatune.merge.sparsify import magnitude_mask, magprune_keep, spectral_truncate

SHAPES = [(7,), (6, 10), (3, 4, 5)]


def models(shape, n, seed=0, spread=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base.to(dtype), [(base + spread * torch.randn(*shape, generator=g)).to(dtype) for _ in range(n)]


def mergekit_params(params: dict) -> dict:
    out = {("lambda" if k == "lambda_" else k): v for k, v in params.items()}
    if "rescale" in out:
        out["rescale"] = {"l1": True, "none": False}[out["rescale"]]
    return out


MAGNITUDE_PRUNE = GeneralizedTaskArithmeticMerge(  # mergekit's sparsify-by-magnitude + task arithmetic sum
    consensus_method=None, sparsification_method=SparsificationMethod.magnitude, default_normalize=False,
    default_rescale=False, method_name="magnitude_prune", method_pretty_name=None, method_reference_url=None)


def oracle(name, tensors, base, params):
    p = mergekit_params(params)
    if name == "linear":
        return merge_tensors(tensors, "linear", parameters=p)
    method = MAGNITUDE_PRUNE if name == "magnitude_prune" else merge_methods.get(name)
    if "consensus" in p:  # a property of mergekit's method, not a parameter
        method = dataclasses.replace(method, consensus_method=ConsensusMethod(p.pop("consensus")))
    return merge_tensors([base, *tensors], method, parameters=p, base_index=0)


DETERMINISTIC = [
    ("linear", {"weight": [1.0, 0.5, 2.0]}),
    ("linear", {"weight": [0.3, 0.7], "normalize": False}),
    ("task_arithmetic", {"weight": [1.0, -0.5, 0.7], "lambda_": 0.8}),
    ("task_arithmetic", {"weight": [1.0, 0.5, 0.7, 0.2], "normalize": True}),
    ("ties", {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.9]}),
    ("ties", {"weight": [1.0, 2.0], "density": 0.1, "normalize": False, "lambda_": 1.5}),
    ("ties", {"weight": [1.0, 0.6, 0.8, 0.4], "density": 0.6, "consensus": "count", "rescale": "l1"}),
    ("magnitude_prune", {"weight": [1.0, 0.5, 0.8], "density": [0.4, 0.7, 1.0]}),
    ("magnitude_prune", {"weight": [0.5, 0.5], "density": 0.3, "normalize": True, "rescale": "l1"}),
    ("breadcrumbs", {"weight": [1.0, 0.5, 0.8], "density": 0.7, "gamma": 0.1}),
    ("breadcrumbs", {"weight": [1.0, 0.7], "density": [0.95, 0.6], "gamma": [0.1, 0.0], "normalize": True}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.5, 0.8, 1.2], "density": 0.6, "gamma": 0.05, "lambda_": 0.9}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.5], "density": 0.5, "gamma": 0.2, "normalize": True,
                          "rescale": "l1"}),
    ("slerp", {"t": 0.3}),
    ("slerp", {"t": 0.85}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
]


def _n_models(name, params):
    if name == "slerp":
        return 2
    w = params.get("weight")
    return len(w) if isinstance(w, list) else 3


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "params"), DETERMINISTIC, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DETERMINISTIC)])
def test_agrees_with_mergekit(name, params, shape):
    base, tensors = models(shape, _n_models(name, params), seed=len(shape))
    if name == "slerp":  # mergekit's slerp takes the first model as its "base" (t = 0)
        ours = ops.apply(name, tensors, None, **params)
        theirs = merge_tensors(tensors, "slerp", parameters=params, base_index=0)
    else:
        ours = ops.apply(name, tensors, base if ops.get(name).needs_base else None, **params)
        theirs = oracle(name, tensors, base, params)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
def test_slerp_nearly_colinear_falls_back_to_lerp_like_mergekit(t):
    a = torch.randn(5, 6)
    for b in (2.0 * a + 1e-6 * torch.randn(5, 6), -0.5 * a):  # colinear and antipodal
        ours = ops.apply("slerp", [a, b], t=t)
        torch.testing.assert_close(ours, (1 - t) * a + t * b, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours, merge_tensors([a, b], "slerp", parameters={"t": t}, base_index=0),
                                   atol=1e-5, rtol=0)


def test_slerp_endpoints_and_great_circle():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(ops.apply("slerp", [a, b], t=0.0), a)
    torch.testing.assert_close(ops.apply("slerp", [a, b], t=1.0), b)
    mid = ops.apply("slerp", [a, b], t=0.5)  # on the unit circle, where lerp would give norm 0.707
    torch.testing.assert_close(mid, torch.tensor([2**-0.5, 2**-0.5, 0.0]))


# -- DARE / DELLA: mergekit's l1 rescale with the same Bernoulli draws, and the papers' properties --------
RANDOM = [
    ("dare_linear", {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.9]}),
    ("dare_linear", {"weight": [1.0, 0.4], "density": 0.6, "normalize": True, "lambda_": 1.3}),
    ("dare_ties", {"weight": [1.0, 0.5, 0.8, 0.3], "density": 0.5}),
    ("dare_ties", {"weight": [1.0, 0.5], "density": [0.2, 0.7], "normalize": True}),
    ("della", {"weight": [1.0, 0.5, 0.8], "density": 0.5, "epsilon": 0.2}),
    ("della", {"weight": [1.0, 0.5], "density": [0.4, 0.7], "epsilon": [0.1, 0.25], "normalize": False}),
    ("della_linear", {"weight": [1.0, 0.5, 0.8], "density": 0.6, "epsilon": 0.15, "lambda_": 0.7}),
]


@pytest.mark.parametrize("rescale", ["l1", "none"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("name", "params"), RANDOM, ids=[f"{n}-{i}" for i, (n, _) in enumerate(RANDOM)])
def test_random_ops_agree_with_mergekit_on_the_same_draws(name, params, shape, rescale):
    base, tensors = models(shape, len(params["weight"]), seed=3)
    params = {**params, "rescale": rescale}
    torch.manual_seed(11)  # mergekit draws from the global RNG; ours from a generator seeded alike
    theirs = oracle(name, tensors, base, params)
    ours = ops.apply(name, tensors, base, seed=11, **params)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_ops_same_seed_same_merge_other_seed_other(name):
    base, tensors = models((8, 8), 3)
    a = ops.apply(name, tensors, base, weight=1.0, density=0.5, seed=1)
    assert torch.equal(a, ops.apply(name, tensors, base, weight=1.0, density=0.5, seed=1))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(a, ops.apply(name, tensors, base, weight=1.0, density=0.5, generator=g))
    assert not torch.equal(a, ops.apply(name, tensors, base, weight=1.0, density=0.5, seed=2))


@pytest.mark.parametrize(("name", "extra"), [("dare_linear", {}), ("della_linear", {"epsilon": 0.3})])
def test_inverse_rescale_is_unbiased_over_seeds(name, extra):
    """E[merge] = task arithmetic: survivors are divided by their keep probability (DARE's 1/(1-p),
    DELLA's per-entry 1/(1-p_i))."""
    base, tensors = models((32,), 2)
    weight, density, seeds = [1.0, 0.5], 0.4, 2000
    mean = sum(ops.apply(name, tensors, base, weight=weight, density=density, seed=s, **extra)
               for s in range(seeds)) / seeds
    expected = ops.apply("task_arithmetic", tensors, base, weight=weight)
    # per-entry std of one draw <= sum_i |w_i tau_i| sqrt((1 - p) / p) with the smallest keep p
    p = density - extra.get("epsilon", 0.0)
    sigma = sum(abs(w) * (t - base).abs() for w, t in zip(weight, tensors)) * ((1 - p) / p) ** 0.5
    assert ((mean - expected).abs() <= 5 * sigma / seeds**0.5 + 1e-6).all()
    one = ops.apply(name, tensors, base, weight=weight, density=density, seed=0, **extra)
    assert (one - expected).abs().max() > 0.1  # a single draw is far from it: the test can fail


def test_dare_drops_the_requested_fraction_and_rescales_survivors():
    base, (model,) = models((100, 100), 1)
    tau = model - base
    out = ops.apply("dare_linear", [model], base, weight=1.0, density=0.3, seed=0) - base
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(out[kept], tau[kept] / 0.3, atol=1e-5, rtol=1e-5)
    full = ops.apply("dare_linear", [model], base, weight=1.0, density=1.0, seed=0)
    torch.testing.assert_close(full, model)  # density 1 drops nothing


def test_magprune_keep_probabilities_rise_linearly_with_magnitude_rank():
    tau = torch.tensor([[0.3, -5.0, 1.0, -0.1, 2.0], [4.0, 3.0, -2.0, 1.0, 0.5]])
    keep = magprune_keep(tau, density=0.5, epsilon=0.2)
    ranks = tau.abs().argsort(dim=1).argsort(dim=1).float()
    torch.testing.assert_close(keep, 0.3 + 0.4 * ranks / 4)  # 0.3 for the smallest ... 0.7 for the largest
    torch.testing.assert_close(keep.mean(dim=1), torch.full((2,), 0.5))
    assert magprune_keep(tau[0], 0.5, 0.2).shape == (5,)  # a 1-D tensor is one row


# -- PCB ------------------------------------------------------------------------------------------
def test_pcb_one_model_is_magnitude_pruning():
    """With one task vector b = Softmax(Norm(d*d))^2 grows with |d|: dropping by b is dropping by magnitude."""
    base, tensors = models((12, 9), 1)
    for density in (0.1, 0.5, 1.0):
        torch.testing.assert_close(ops.apply("pcb", tensors, base, density=density),
                                   ops.apply("magnitude_prune", tensors, base, weight=1.0, density=density),
                                   atol=1e-6, rtol=0)


def test_pcb_without_drop_is_an_entrywise_convex_combination():
    base, tensors = models((6, 7), 3)
    taus = torch.stack([t - base for t in tensors])
    out = ops.apply("pcb", tensors, base, density=1.0) - base
    assert (out >= taus.amin(0) - 1e-6).all() and (out <= taus.amax(0) + 1e-6).all()
    assert not torch.allclose(out, taus.mean(0), atol=1e-3)  # and not the plain average
    permuted = ops.apply("pcb", tensors[::-1], base, density=1.0) - base
    torch.testing.assert_close(out, permuted)
    same = ops.apply("pcb", [tensors[0]] * 3, base, density=1.0)
    torch.testing.assert_close(same, tensors[0])
    twice = ops.apply("pcb", tensors, base, density=1.0, lambda_=2.0) - base
    torch.testing.assert_close(twice, 2 * out)


def test_pcb_inter_balancing_weighs_down_the_dissenting_task():
    v = torch.linspace(0.5, 2.0, 10)
    dissent = v.clone()
    dissent[-1] = -v[-1]  # task 3 disagrees on the largest entry
    base = torch.zeros(10)
    out = ops.apply("pcb", [v, v, dissent], base, density=1.0)
    assert out[-1] > v[-1] / 3 + 0.1  # the plain mean is v/3; the majority wins more than that
    torch.testing.assert_close(out[:-1], v[:-1])


def test_pcb_matches_the_papers_equations_by_hand():
    """b_i = Softmax(n Norm(d_i d_i)) * sum_j Softmax(Norm(d_i d_j)); drop to the top r of b_i;
    merge sum_i b_hat_i d_i / sum_i b_hat_i: in plain Python floats on 2 tasks x 4 entries."""
    d = [[0.5, -1.0, 2.0, 0.25], [1.5, 0.5, -1.0, 0.75]]

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]

    def norm(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) for x in xs]

    n = len(d)
    b = []
    for di in d:
        intra = softmax([n * v for v in norm([x * x for x in di])])
        inter = [sum(col) for col in zip(*(softmax(norm([x * y for x, y in zip(di, dj)])) for dj in d))]
        b.append([p * q for p, q in zip(intra, inter)])
    for density, keep in ((1.0, 4), (0.5, 2)):
        b_hat = [[v if v >= sorted(bi, reverse=True)[keep - 1] else 0.0 for v in bi] for bi in b]
        expected = [sum(bh[k] * di[k] for bh, di in zip(b_hat, d)) / (sum(bh[k] for bh in b_hat) or 1.0)
                    for k in range(4)]
        out = ops.apply("pcb", [torch.tensor(di) for di in d], torch.zeros(4), density=density)
        torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)


def test_pcb_drop_keeps_density_of_each_task():
    base, tensors = models((20, 10), 2)
    out = ops.apply("pcb", tensors, base, density=0.1) - base
    changed = (out != 0).sum().item()
    assert 20 <= changed <= 40  # each task keeps 20 of 200 entries; the union is 20..40


# -- STAR -----------------------------------------------------------------------------------------
def test_star_full_spectrum_is_task_arithmetic_average():
    for shape in SHAPES:
        base, tensors = models(shape, 3)
        torch.testing.assert_close(ops.apply("star", tensors, base, eta=1.0),
                                   ops.apply("task_arithmetic", tensors, base, weight=1.0, normalize=True),
                                   atol=1e-5, rtol=0)


def test_star_keeps_rank_one_task_matrices_and_bias_vectors_whole():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=g)
    tensors = [base + torch.outer(torch.randn(8, generator=g), torch.randn(6, generator=g)) for _ in range(3)]
    expected = ops.apply("task_arithmetic", tensors, base, weight=[1.0, 2.0, 1.0], normalize=True)
    for eta in (0.05, 0.4):
        torch.testing.assert_close(ops.apply("star", tensors, base, eta=eta, weight=[1.0, 2.0, 1.0]), expected,
                                   atol=1e-5, rtol=0)
    b, vs = models((9,), 2)
    torch.testing.assert_close(ops.apply("star", vs, b, eta=0.1), (vs[0] + vs[1]) / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("eta", "rank"), [(0.1, 1), (0.39, 1), (0.41, 2), (0.69, 2), (0.71, 3), (0.95, 4), (1.0, 4)])
def test_star_truncates_by_nuclear_norm_fraction_and_restores_it(eta, rank):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(7, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(5, 4, generator=g))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # cumulative share of the nuclear norm: 0.4, 0.7, 0.9, 1.0
    out = spectral_truncate(u @ torch.diag(s) @ v.T, eta)
    sv = torch.linalg.svdvals(out)
    assert int((sv > 1e-4).sum()) == rank
    torch.testing.assert_close(sv.sum(), s.sum())  # nuclear norm restored
    torch.testing.assert_close(sv[:rank], s[:rank] * s.sum() / s[:rank].sum(), atol=1e-5, rtol=0)


# -- Model Stock ----------------------------------------------------------------------------------
def test_model_stock_interpolation_ratio_follows_the_angle():
    base = torch.zeros(4)
    e1, e2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    torch.testing.assert_close(ops.apply("model_stock", [e1, e2], base), base)  # orthogonal: t = 0
    torch.testing.assert_close(ops.apply("model_stock", [e1, 3 * e1], base), 2 * e1)  # colinear: t = 1, average
    a, b = e1, 0.5 * e1 + (3**0.5 / 2) * e2  # cos = 0.5, k = 2: t = 2 * 0.5 / 1.5
    torch.testing.assert_close(ops.apply("model_stock", [a, b], base), (2 / 3) * (a + b) / 2)


# -- every operator: dtypes and inputs ---------------------------------------------------------------
PARAMS = {
    "linear": {"weight": [1.0, 0.5, 0.8]}, "task_arithmetic": {"weight": [1.0, 0.5, 0.8]},
    "ties": {"weight": 1.0, "density": 0.5}, "magnitude_prune": {"weight": 1.0, "density": 0.5},
    "breadcrumbs": {"weight": 1.0, "density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.5, "gamma": 0.1},
    "dare_linear": {"weight": 1.0, "density": 0.5}, "dare_ties": {"weight": 1.0, "density": 0.5},
    "della": {"weight": 1.0, "density": 0.5}, "della_linear": {"weight": 1.0, "density": 0.5},
    "slerp": {"t": 0.3}, "model_stock": {}, "pcb": {"density": 0.3}, "star": {"eta": 0.4},
}


def test_every_registered_operator_is_covered():
    assert sorted(PARAMS) == ops.available()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_bfloat16_in_bfloat16_out_same_math_and_inputs_untouched(name):
    base, tensors = models((6, 8), 2 if name == "slerp" else 3, dtype=torch.bfloat16)
    copies = [t.clone() for t in [base, *tensors]]
    out = ops.apply(name, tensors, base, seed=0, **PARAMS[name])
    assert out.dtype == torch.bfloat16 and out.shape == base.shape
    for t, c in zip([base, *tensors], copies):
        assert torch.equal(t, c)
    ref = ops.apply(name, [t.float() for t in tensors], base.float(), seed=0, **PARAMS[name])
    assert torch.equal(out, ref.to(torch.bfloat16))  # float32 work dtype, one cast at the end


# -- bad input: errors that name the problem ------------------------------------------------------
@pytest.mark.parametrize(("name", "params", "tensors", "message"), [
    ("ties", {"weight": 1.0, "foo": 1}, 3, "unknown parameter"),
    ("ties", {"weight": [1.0, 2.0]}, 3, "'weight' has 2 values for 3 models"),
    ("ties", {}, 3, "'weight' is required"),
    ("slerp", {"t": 0.5}, 3, "exactly 2 models"),
    ("slerp", {}, 2, "'t'"),
    ("no_such_method", {}, 2, "unknown merge method"),
    ("model_stock", {}, 1, "at least 2"),
    ("ties", {"weight": 1.0, "consensus": "vote"}, 2, "consensus must be"),
])
def test_bad_parameters_are_named(name, params, tensors, message):
    base, ts = models((4, 4), tensors)
    with pytest.raises(ValueError, match=message):
        ops.apply(name, ts, base, **params)


@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "breadcrumbs", "dare_linear", "dare_ties", "della",
                                  "pcb"])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, [0.5, 2.0]])
def test_density_out_of_range(name, density):
    base, ts = models((4, 4), 2)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        ops.apply(name, ts, base, weight=1.0, density=density)


@pytest.mark.parametrize(("name", "params", "message"), [
    ("breadcrumbs", {"density": 0.5, "gamma": 1.0}, r"gamma must be in \[0, 1\)"),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": -0.1}, r"gamma must be in \[0, 1\)"),
    ("della", {"density": 0.5, "epsilon": 0.6}, "epsilon must keep density"),
    ("della_linear", {"density": [0.5, 0.9], "epsilon": [0.1, 0.2]}, "model 1"),
    ("dare_linear", {"density": 0.5, "rescale": True}, "rescale must be one of"),
    ("ties", {"density": 0.5, "rescale": "inverse"}, "rescale must be one of"),
    ("star", {"eta": 40}, r"eta .* \(0, 1\]"),
    ("star", {"eta": 0.0}, r"eta .* \(0, 1\]"),
])
def test_bad_hyperparameters_are_named(name, params, message):
    base, ts = models((4, 4), 2)
    with pytest.raises(ValueError, match=message):
        ops.apply(name, ts, base, weight=1.0, **params)


def test_missing_base_and_shape_mismatch_are_named():
    base, ts = models((4, 4), 2)
    with pytest.raises(ValueError, match="needs a base"):
        ops.apply("dare_ties", ts, None, weight=1.0)
    with pytest.raises(ValueError, match=r"model 1 has shape \(4, 5\), expected \(4, 4\)"):
        ops.apply("pcb", [ts[0], torch.zeros(4, 5)], base)
    with pytest.raises(ValueError, match=r"model 1 has shape \(3,\), expected \(4, 4\)"):
        ops.apply("slerp", [ts[0], torch.zeros(3)], t=0.5)


@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.999, 1.0])
def test_magnitude_cutoff_keeps_exactly_the_top_k(density):
    from deltatune.merge.sparsify import magnitude_cutoff

    tau = torch.randn(37, 29, generator=torch.Generator().manual_seed(3))
    keep = tau.abs() >= magnitude_cutoff(tau.abs(), density)
    assert torch.equal(keep, magnitude_mask(tau, density))


def test_ties_with_cutoffs_on_row_blocks_equals_whole_tensor_ties():
    from deltatune.merge.sparsify import magnitude_cutoff

    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 16, generator=g)
    ts = [base + torch.randn(40, 16, generator=g) for _ in range(3)]
    kw = dict(weight=[0.5, 0.3, 0.2], density=[0.2, 0.5, 0.8])
    whole = ops.apply("ties", ts, base, **kw)
    cut = [magnitude_cutoff((t - base).abs(), d) for t, d in zip(ts, kw["density"])]
    blocks = [ops.apply("ties", [t[a:a + 7] for t in ts], base[a:a + 7], cutoff=cut, **kw) for a in range(0, 40, 7)]
    torch.testing.assert_close(torch.cat(blocks), whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rescale"):
        ops.apply("ties", ts, base, cutoff=cut, rescale="l1", **kw)
