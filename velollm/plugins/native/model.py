"""Decoder-only transformers in numpy: llama (and mistral-style GQA), qwen2, gemma3.

One forward pass handles a batch of new tokens (prefill: matrix-matrix products) or a single
token (decode: matrix-vector), reading and extending a float32 KV cache. The graph follows
llama.cpp's (``src/models/{llama,qwen2,gemma3}.cpp``) operation by operation, so hidden states
line up with llama.cpp's and every intermediate value is plain numpy for researchers.

Architecture differences, all driven by GGUF metadata:

* llama: RoPE on adjacent pairs (GGUF stores Q/K permuted for it), optional ``rope_freqs``.
* qwen2: NeoX RoPE (rotate halves), Q/K/V biases.
* gemma3: embeddings scaled by sqrt(n_embd), RMS norm on Q and K per head, extra norms after
  attention and FFN, GELU(tanh)-gated FFN, every 6th layer global and the rest sliding-window
  (RoPE base 10k there, the file's base on global layers), Q scaled after RoPE, tied output head,
  optional final logit soft-capping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from velollm.errors import ContextOverflow, InvalidModelFile, UnsupportedArchitecture
from velollm.plugins.native.numerics import Numerics, activation_kind, rope_tables
from velollm.plugins.native.weights import WeightStore

SUPPORTED_ARCHITECTURES = frozenset({"llama", "qwen2", "gemma3"})


@dataclass
class ModelConfig:
    """Hyperparameters read from the GGUF metadata."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_v: int
    n_ff: int
    eps: float
    n_ctx_train: int
    n_rot: int
    rope_base: float
    rope_scale: float  # ggml freq_scale (1 / linear scaling factor)
    rope_neox: bool
    rope_base_swa: float = 10000.0
    rope_scale_swa: float = 1.0
    sliding_window: int = 0
    swa_layers: list[bool] = field(default_factory=list)
    attn_scale: float = 1.0  # multiplies Q·K
    q_prescale: float | None = None  # gemma3 scales Q itself (after RoPE) and uses attn_scale 1
    embed_scale: float | None = None
    final_softcap: float | None = None
    tied_output: bool = False

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], tensors: WeightStore, name: str) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"{name}: the native backend cannot run architecture {arch!r} "
                f"(it runs: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            return default if value is None else value

        def need(key: str) -> Any:
            value = meta.get(f"{arch}.{key}")
            if value is None:
                raise InvalidModelFile(f"{name} lacks the {arch}.{key} metadata key")
            return value

        n_embd, n_layer, n_head = int(need("embedding_length")), int(need("block_count")), need("attention.head_count")
        n_head_kv = get("attention.head_count_kv", n_head)
        if isinstance(n_head, list) or isinstance(n_head_kv, list):
            raise UnsupportedArchitecture(f"{name}: per-layer head counts are not supported by the native backend")
        head_dim = int(get("attention.key_length", n_embd // int(n_head)))
        embd = tensors.get("token_embd.weight")
        scaling = get("rope.scaling.type", "none")
        factor = float(get("rope.scaling.factor", 0.0) or 0.0)
        if scaling not in ("none", "linear") and factor not in (0.0, 1.0):
            raise UnsupportedArchitecture(f"{name}: RoPE scaling {scaling!r} is not supported by the native backend")
        cfg = cls(
            arch=arch, n_vocab=embd.rows, n_embd=n_embd, n_layer=n_layer, n_head=int(n_head),
            n_head_kv=int(n_head_kv), head_dim=head_dim, head_dim_v=int(get("attention.value_length", head_dim)),
            n_ff=int(need("feed_forward_length")), eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            n_ctx_train=int(get("context_length", 0) or 0), n_rot=int(get("rope.dimension_count", head_dim)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_scale=1.0 / factor if scaling == "linear" and factor > 0 else 1.0,
            rope_neox=arch in ("qwen2", "gemma3"),
            tied_output="output.weight" not in tensors,
        )
        cfg.swa_layers = [False] * n_layer
        cfg.attn_scale = 1.0 / math.sqrt(head_dim)
        if arch == "gemma3":
            cfg.embed_scale = math.sqrt(n_embd)
            cfg.rope_base_swa = float(get("rope.freq_base_swa", 10000.0))
            cfg.sliding_window = int(get("attention.sliding_window", 0) or 0)
            pattern = get("attention.sliding_window_pattern", 6)
            if isinstance(pattern, list):
                cfg.swa_layers = [bool(p) for p in pattern[:n_layer]]
            elif cfg.sliding_window > 0:
                cfg.swa_layers = [int(pattern) == 0 or il % int(pattern) < int(pattern) - 1 for il in range(n_layer)]
            # llama.cpp: 27B scales by 1/sqrt(n_embd/n_head), the others by 1/sqrt(head_dim)
            cfg.q_prescale = 1.0 / math.sqrt(n_embd / cfg.n_head if n_layer == 62 else head_dim)
            cfg.attn_scale = 1.0
            softcap = get("final_logit_softcapping")
            cfg.final_softcap = float(softcap) if softcap else None
        if cfg.n_head % cfg.n_head_kv:
            raise InvalidModelFile(f"{name}: {cfg.n_head} query heads do not divide into {cfg.n_head_kv} KV heads")
        return cfg


class KVCache:
    """Keys and values of every layer for one sequence, preallocated to the context length.

    ``np.zeros`` memory is only committed as positions fill up, so a large ``n_ctx`` costs
    address space, not RAM, until it is used.
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int) -> None:
        self.n_ctx = n_ctx
        self.k = [np.zeros((cfg.n_head_kv, n_ctx, cfg.head_dim), np.float32) for _ in range(cfg.n_layer)]
        self.v = [np.zeros((cfg.n_head_kv, n_ctx, cfg.head_dim_v), np.float32) for _ in range(cfg.n_layer)]
        self.tokens: list[int] = []  # what positions 0..len-1 hold

    @property
    def n(self) -> int:
        return len(self.tokens)

    def truncate(self, n: int) -> None:
        """Forget positions ``n`` and later (their values are simply overwritten later)."""
        del self.tokens[n:]


class _Linear:
    """Weights that see the same input, stacked into one matrix (one BLAS call instead of three)."""

    def __init__(self, store: WeightStore, numerics: Numerics, names: tuple[str, ...],
                 biases: tuple[str, ...] = ()) -> None:
        self.store, self.numerics = store, numerics
        kinds = {activation_kind(store.get(n).qtype) for n in names}
        # stacking needs one activation format; otherwise keep one product per weight
        self.groups = [names] if len(kinds) == 1 else [(n,) for n in names]
        self.kinds = [activation_kind(store.get(g[0]).qtype) for g in self.groups]
        self.bias_names = biases
        self._bias: np.ndarray | None = None
        self._weights: list[np.ndarray | None] | None = None
        self.out_features = sum(store.get(n).rows for n in names)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._weights is None:  # first use: dequantize (or learn that the budget says stream)
            self._weights = [self.store.matrix(names) for names in self.groups]
        outs = []
        for names, kind, w in zip(self.groups, self.kinds, self._weights, strict=True):
            if w is None:
                outs.append(self.store.streamed_matmul(
                    names, x, lambda t, a: self.numerics.activations(activation_kind(t.qtype), a)))
                continue
            xa = self.numerics.activations(kind, x)
            outs.append((w @ xa[0])[None, :] if xa.shape[0] == 1 else xa @ w.T)
        y = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=-1)
        if self.bias_names:
            if self._bias is None:
                self._bias = np.concatenate([self.store.vector(b) for b in self.bias_names])
            y += self._bias
        return y


class _Layer:
    def __init__(self, store: WeightStore, numerics: Numerics, cfg: ModelConfig, il: int) -> None:
        p = f"blk.{il}."

        def has(name: str) -> bool:
            return p + name in store

        qkv = tuple(p + f"attn_{x}.weight" for x in "qkv")
        biases = tuple(p + f"attn_{x}.bias" for x in "qkv") if all(has(f"attn_{x}.bias") for x in "qkv") else ()
        if not biases and any(has(f"attn_{x}.bias") for x in "qkv"):
            raise UnsupportedArchitecture(f"layer {il}: partial Q/K/V biases are not supported")
        self.qkv = _Linear(store, numerics, qkv, biases)
        self.wo = _Linear(store, numerics, (p + "attn_output.weight",))
        self.gate_up = _Linear(store, numerics, (p + "ffn_gate.weight", p + "ffn_up.weight"))
        self.down = _Linear(store, numerics, (p + "ffn_down.weight",))
        self.names = {k: p + v for k, v in dict(
            attn_norm="attn_norm.weight", ffn_norm="ffn_norm.weight", q_norm="attn_q_norm.weight",
            k_norm="attn_k_norm.weight", post_attn="post_attention_norm.weight", post_ffn="post_ffw_norm.weight",
        ).items() if has(v)}
        for required in ("attn_norm", "ffn_norm"):
            if required not in self.names:
                raise InvalidModelFile(f"layer {il} has no {required} weight")
        self.n_q = cfg.n_head * cfg.head_dim
        self.n_k = cfg.n_head_kv * cfg.head_dim
        self.swa = cfg.swa_layers[il] if cfg.swa_layers else False


class Transformer:
    """The model graph over a :class:`WeightStore`; stateless apart from lazily built tables."""

    def __init__(self, cfg: ModelConfig, store: WeightStore, numerics: Numerics, n_ctx: int) -> None:
        self.cfg, self.store, self.numerics, self.n_ctx = cfg, store, numerics, n_ctx
        self.layers = [_Layer(store, numerics, cfg, il) for il in range(cfg.n_layer)]
        self.output = _Linear(store, numerics, ("token_embd.weight",) if cfg.tied_output else ("output.weight",))
        freq_factors = store.vector("rope_freqs.weight") if "rope_freqs.weight" in store else None
        self._rope = rope_tables(n_ctx, cfg.n_rot, cfg.rope_base, cfg.rope_scale, freq_factors)
        self._rope_swa = (rope_tables(n_ctx, cfg.n_rot, cfg.rope_base_swa, cfg.rope_scale_swa)
                          if any(cfg.swa_layers) else self._rope)

    # --- building blocks --------------------------------------------------------------------
    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """RMS norm times weight (ggml_rms_norm: sum of squares in double, scale in float)."""
        mean = (np.einsum("...i,...i->...", x, x, dtype=np.float64) / x.shape[-1]).astype(np.float32)
        scale = np.float32(1) / np.sqrt(mean + np.float32(self.cfg.eps))
        return (x * scale[..., None]) * self.store.vector(name)

    def _rope_apply(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate the first n_rot dims of every head of ``x`` (T, heads, head_dim) in place;
        ``cos``/``sin`` are (T, 1, n_rot/2) for the tokens' positions."""
        n_rot = self.cfg.n_rot
        if self.cfg.rope_neox:
            half = n_rot // 2
            x0, x1 = x[..., :half].copy(), x[..., half:n_rot].copy()
            x[..., :half] = x0 * cos - x1 * sin
            x[..., half:n_rot] = x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
            x[..., 0:n_rot:2] = x0 * cos - x1 * sin
            x[..., 1:n_rot:2] = x0 * sin + x1 * cos
        return x

    def _mask(self, p0: int, t: int, window: int) -> tuple[int, np.ndarray | None]:
        """First key position and the (t, keys) causal/sliding-window mask (None: nothing masked)."""
        end = p0 + t
        lo = max(0, p0 - window + 1) if window else 0
        qpos = np.arange(p0, end)[:, None]
        kpos = np.arange(lo, end)[None, :]
        masked = kpos > qpos
        if window:
            masked |= (qpos - kpos) >= window
        return lo, (masked if masked.any() else None)

    def _attention(self, q: np.ndarray, il: int, cache: KVCache, p0: int,
                   mask: tuple[int, np.ndarray | None]) -> np.ndarray:
        """Causal (optionally sliding-window) attention of queries at p0.. over the cache."""
        cfg, num = self.cfg, self.numerics
        t = q.shape[0]
        end = p0 + t
        lo, masked = mask
        keys = cache.k[il][:, lo:end]  # (kv, S, d)
        values = cache.v[il][:, lo:end]
        group = cfg.n_head // cfg.n_head_kv
        qh = num.half(q).transpose(1, 0, 2).reshape(cfg.n_head_kv, group * t, cfg.head_dim)
        scores = np.matmul(qh, keys.transpose(0, 2, 1)).reshape(cfg.n_head_kv, group, t, end - lo)
        if cfg.attn_scale != 1.0:
            scores *= np.float32(cfg.attn_scale)
        if masked is not None:
            scores[..., masked] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores *= (1.0 / scores.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
        probs = num.half(scores).reshape(cfg.n_head_kv, group * t, end - lo)
        out = np.matmul(probs, values)  # (kv, group*t, dv)
        return out.reshape(cfg.n_head, t, cfg.head_dim_v).transpose(1, 0, 2).reshape(t, cfg.n_head * cfg.head_dim_v)

    # --- forward ----------------------------------------------------------------------------
    def forward(self, tokens: list[int], cache: KVCache, *, logits: str | np.ndarray = "last",
                hidden: list[np.ndarray] | None = None) -> np.ndarray | None:
        """Run ``tokens`` after what ``cache`` holds; return logits of the last position
        (``"last"``), of every new position (``"all"``), of the rows given as an index array
        (positions relative to ``tokens``), or nothing (``"none"``).

        ``hidden``, when given, receives the residual stream after the embedding and after each
        layer (float32, one row per new token).
        """
        cfg, num, store = self.cfg, self.numerics, self.store
        t = len(tokens)
        p0 = cache.n
        if p0 + t > cache.n_ctx:
            raise ContextOverflow(f"{p0 + t} tokens do not fit the context window of {cache.n_ctx}")
        ids = np.asarray(tokens, dtype=np.int64)
        if t == 0:
            return None
        if ids.min() < 0 or ids.max() >= cfg.n_vocab:
            raise ValueError(f"token ids must be in 0..{cfg.n_vocab - 1}")
        x = store.rows("token_embd.weight", ids)
        if cfg.embed_scale is not None:
            x *= np.float32(cfg.embed_scale)
        if hidden is not None:
            hidden.append(x.copy())
        positions = np.arange(p0, p0 + t)
        if isinstance(logits, np.ndarray):
            rows: np.ndarray | slice | None = logits
        else:
            rows = None if logits == "all" else slice(t - 1, t)
        keep = rows if isinstance(rows, slice) else None  # the last layer may skip unwanted rows
        ropes = {swa: (table[0][positions][:, None, :], table[1][positions][:, None, :])
                 for swa, table in ((False, self._rope), (True, self._rope_swa))}
        masks = {swa: self._mask(p0, t, cfg.sliding_window if swa else 0) for swa in (False, True)}
        last_masks = {swa: self._mask(p0 + t - 1, 1, cfg.sliding_window if swa else 0) for swa in (False, True)}
        for il, layer in enumerate(self.layers):
            h = self._norm(x, layer.names["attn_norm"])
            qkv = layer.qkv(h)
            q = qkv[:, :layer.n_q].reshape(t, cfg.n_head, cfg.head_dim)
            k = qkv[:, layer.n_q:layer.n_q + layer.n_k].reshape(t, cfg.n_head_kv, cfg.head_dim)
            v = qkv[:, layer.n_q + layer.n_k:].reshape(t, cfg.n_head_kv, cfg.head_dim_v)
            if "q_norm" in layer.names:
                q = self._norm(q, layer.names["q_norm"])
                k = self._norm(k, layer.names["k_norm"])
            else:
                q, k = q.copy(), k.copy()
            cos, sin = ropes[layer.swa]
            self._rope_apply(q, cos, sin)
            self._rope_apply(k, cos, sin)
            if cfg.q_prescale is not None:
                q *= np.float32(cfg.q_prescale)
            cache.k[il][:, p0:p0 + t] = num.half(k).transpose(1, 0, 2)
            cache.v[il][:, p0:p0 + t] = num.half(v).transpose(1, 0, 2)
            last = il == cfg.n_layer - 1 and keep is not None and hidden is None
            if last:  # like llama.cpp: the last layer only finishes the rows whose logits are wanted
                q, x = q[keep], x[keep]
                attn = self._attention(q, il, cache, p0 + t - 1, last_masks[layer.swa])
            else:
                attn = self._attention(q, il, cache, p0, masks[layer.swa])
            o = layer.wo(attn)
            if "post_attn" in layer.names:
                o = self._norm(o, layer.names["post_attn"])
            x = x + o
            h = self._norm(x, layer.names["ffn_norm"])
            gu = layer.gate_up(h)
            gate, up = gu[:, :cfg.n_ff], gu[:, cfg.n_ff:]
            act = (num.gelu(gate) if cfg.arch == "gemma3" else num.silu(gate)) * up
            d = layer.down(act)
            if "post_ffn" in layer.names:
                d = self._norm(d, layer.names["post_ffn"])
            x = x + d
            if hidden is not None:
                hidden.append(x.copy())
        cache.tokens.extend(int(i) for i in ids)
        if isinstance(logits, str) and logits == "none":
            return None
        if rows is not None and not (keep is not None and x.shape[0] == 1):
            x = x[rows]
        out = self.output(self._norm(x, "output_norm.weight"))
        if cfg.final_softcap:
            cap = np.float32(cfg.final_softcap)
            out = np.tanh(out / cap) * cap
        return out
