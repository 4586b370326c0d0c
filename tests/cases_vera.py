"""Conformance cases for VeRA, FourierFT and MoRA.

Parameter counts are computed here from the module shapes and the config, independently of the library:
VeRA trains lambda_d (r) and lambda_b (out) per layer (the shared random A, B are buffers, not parameters);
FourierFT trains n spectral coefficients per layer; MoRA one r_hat x r_hat matrix,
r_hat = round(sqrt((in + out) r)) (rounded down to even for the rope variant).
"""

from __future__ import annotations

import math
import re

from torch import nn

import deltatune as dt
from method_cases import Case

TRANSFORMERS = ("llama", "gpt2", "bert")


def _out_in(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    fan_in, fan_out = module.weight.shape  # transformers Conv1D: weight (in, out)
    return fan_out, fan_in


# -- VeRA --------------------------------------------------------------------------------------------
def vera_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    out_f, _ = _out_in(module)
    return cfg.r + out_f, cfg.r + out_f


def vera(**kw):
    return lambda: dt.config("vera", r=8, **kw)


def vera_random(**kw):
    return lambda: dt.config("vera", r=8, init_weights=False, **kw)


# -- FourierFT ---------------------------------------------------------------------------------------
def fourierft_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    n = next((v for k, v in cfg.n_frequency_pattern.items() if re.match(rf".*\.{k}$", path)),
             cfg.n_frequency_pattern.get(path, cfg.n_frequency))
    return n, n


def fourierft(**kw):
    return lambda: dt.config("fourierft", n_frequency=32, scaling=20.0, **kw)


FFT_PATTERN = {"n_frequency_pattern": {"v_proj": 12, r"layers\.1\.mlp\.down_proj": 48, "c_fc": 20, "2": 16}}


# -- MoRA --------------------------------------------------------------------------------------------
def mora_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    out_f, in_f = _out_in(module)
    r_hat = int(math.sqrt((in_f + out_f) * cfg.r) + 0.5)
    if cfg.mora_type == "rope":
        r_hat -= r_hat % 2
    return r_hat * r_hat, r_hat * r_hat


def mora(**kw):
    return lambda: dt.config("mora", **{"r": 4, **kw})


def mora_random(**kw):
    return lambda: dt.config("mora", **{"r": 4, "init": "random", **kw})


CASES: list[Case] = [
    Case("vera", vera(), ("mlp", *TRANSFORMERS), vera_count, vera_random()),
    Case("vera-no-projection", vera(save_projection=False, projection_prng_key=7), ("mlp", "llama", "gpt2"),
         vera_count, vera_random(save_projection=False, projection_prng_key=7)),
    Case("vera-dropout", vera(dropout=0.3, d_initial=0.5), ("mlp", "llama"), vera_count,
         vera_random(dropout=0.3)),
    # PEFT's default FourierFT init is a random spectrum: not the identity (init_weights=True gives zeros).
    # The saved spectrum does not depend on the layer's shape, so a wrong-shape load cannot be detected.
    Case("fourierft", fourierft(), ("mlp", *TRANSFORMERS), fourierft_count, identity=False, shape_checked=False),
    Case("fourierft-zero-init", fourierft(init_weights=True), ("mlp", "llama", "gpt2"), fourierft_count,
         fourierft(), shape_checked=False),
    Case("fourierft-pattern", fourierft(**FFT_PATTERN), ("mlp", "llama", "gpt2"), fourierft_count,
         identity=False, shape_checked=False),
    Case("mora", mora(), ("mlp", *TRANSFORMERS), mora_count, mora_random()),
    Case("mora-sharing", mora(mora_type="sharing"), ("mlp", *TRANSFORMERS), mora_count,
         mora_random(mora_type="sharing")),
    Case("mora-dropout", mora(dropout=0.3, r=2), ("mlp", "llama"), mora_count, mora_random(dropout=0.3, r=2)),
]
