"""Two ways to do the arithmetic: exactly in float32, or the way llama.cpp's CPU backend rounds.

llama.cpp does not multiply quantized weights by float activations: it first quantizes the
activations too (8-bit blocks: ``Q8_0`` for the 32-element formats, ``Q8_K`` for k-quants),
keeps the KV cache in float16, feeds attention probabilities to the value product in float16,
and computes GELU through a float16 lookup table. Each step moves logits by ~1e-3, enough to
flip a greedy choice between two near-tied tokens now and then.

``ggml`` mode reproduces those roundings in numpy (cheap: O(n) per product against the O(n·m)
product itself), so the native engine follows llama.cpp token for token. ``exact`` mode skips
them: plain float32 math on the dequantized weights, an independent reference.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as Q

# which activation format llama.cpp's CPU vec_dot pairs with each weight type
_Q8_0_FAMILY = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL}
_Q8_K_FAMILY = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
                Q.IQ1_S, Q.IQ1_M, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0}

MODES = ("ggml", "exact")

_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_GELU_COEF_A = np.float32(0.044715)


def activation_kind(qtype: Q) -> str:
    """The activation format llama.cpp uses against weights of ``qtype``."""
    if qtype in _Q8_0_FAMILY:
        return "q8_0"
    if qtype in _Q8_K_FAMILY:
        return "q8_K"
    if qtype == Q.F16:
        return "f16"
    if qtype == Q.BF16:
        return "bf16"
    return "f32"


def _q8_0(x: np.ndarray) -> np.ndarray:
    """ggml-cpu quantize_row_q8_0 then back: 32-value blocks, scale amax/127 stored as fp16."""
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (np.rint(blocks * inv) * d).reshape(x.shape)


def _q8_K(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_K then back: 256-value blocks, scale -max/127 from the largest |x|."""
    blocks = x.reshape(-1, 256)
    pick = np.abs(blocks).argmax(axis=1)
    mx = blocks[np.arange(blocks.shape[0]), pick][:, None]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(iscale * blocks), np.float32(127))
    return (q * d).reshape(x.shape)


def f16_round(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Gemma's ``gelu_pytorch_tanh``), in float32 like ggml_gelu_f32."""
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(_SQRT_2_OVER_PI * x * (np.float32(1) + _GELU_COEF_A * x * x)))


class Numerics:
    """The rounding policy of one engine (see module docstring)."""

    def __init__(self, mode: str = "ggml") -> None:
        if mode not in MODES:
            raise ValueError(f"numerics must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.ggml = mode == "ggml"

    def activations(self, kind: str, x: np.ndarray) -> np.ndarray:
        """``x`` as the matrix product against weights of activation ``kind`` sees it."""
        if not self.ggml or kind == "f32":
            return x
        if kind == "q8_0" and x.shape[-1] % 32 == 0:
            return _q8_0(x)
        if kind == "q8_K" and x.shape[-1] % 256 == 0:
            return _q8_K(x)
        if kind == "f16":
            return f16_round(x)
        if kind == "bf16":
            return _bf16_round(x)
        return x

    def half(self, x: np.ndarray) -> np.ndarray:
        """Values that llama.cpp holds in float16 (KV cache, Q for Q·K, probabilities for P·V)."""
        return f16_round(x) if self.ggml else x

    def gelu(self, x: np.ndarray) -> np.ndarray:
        """GELU; in ggml mode through float16 in and out, as ggml's lookup table does (|x| < 10)."""
        if not self.ggml:
            return gelu_tanh(x)
        table = f16_round(gelu_tanh(f16_round(x)))
        return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, table)).astype(np.float32)

    def silu(self, x: np.ndarray) -> np.ndarray:
        return x / (np.float32(1) + np.exp(-x))


def rope_tables(n_ctx: int, n_rot: int, base: float, freq_scale: float,
                freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of every position and rotary pair, computed in float32 the way ggml builds its cache
    (theta multiplied up pair by pair, so the rounding matches)."""
    half = n_rot // 2
    theta_scale = np.float32(math.pow(np.float32(base), np.float32(-2.0) / np.float32(n_rot)))
    theta = np.arange(n_ctx, dtype=np.float32)
    thetas = np.empty((n_ctx, half), np.float32)
    for i in range(half):
        thetas[:, i] = theta
        theta = (theta * theta_scale).astype(np.float32)
    if freq_factors is not None:
        thetas = (thetas / freq_factors[:half].astype(np.float32)).astype(np.float32)
    thetas = (np.float32(freq_scale) * thetas).astype(np.float32)
    t64 = thetas.astype(np.float64)
    return np.cos(t64).astype(np.float32), np.sin(t64).astype(np.float32)
