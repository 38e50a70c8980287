"""The π₀ / π₀.₅ model in Flax, numerically the same as openpi's JAX models, and its operations the scripts use.

Architecture (Black et al., "π₀: A Vision-Language-Action Flow Model"; openpi):
  prefix = [SigLIP tokens of each camera (masked cameras stay in the sequence) | prompt embeddings * sqrt(W)]
  suffix = [state token (π₀ only) | action tokens at flow time t]
  Two Gemma experts (the VLM for the prefix, the action expert for the suffix) run the same layers side by side and
  attend jointly over the concatenated tokens (prefix-LM mask, RoPE positions from the cumulative input mask). π₀.₅
  conditions the action expert on t through adaRMS norms. The parameter tree is openpi's, with no renaming.

Shape letters: B batch, N candidates, H chunk length, A action dim, L prompt tokens, W width, D depth, K kv heads,
G query heads per kv head, E head dim; in attention T the query and S the key tokens, P the cached prefix tokens.
`prefix()` runs the VLM once per observation; every denoising step and every candidate attends to its KV cache by
broadcasting (never tiled or recomputed), and critics read its pooled features.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from common import RunError

Params = dict[str, Any]
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's camera order


# ----------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    vlm: GemmaConfig
    expert: GemmaConfig
    vit: SigLIPConfig
    pi05: bool = False
    discrete_state: bool | None = None  # π₀.₅: the state as 256-bin text in the prompt (None: = pi05, like openpi)
    vocab_size: int = 257_152
    action_dim: int = 32
    state_dim: int | None = None  # π₀'s state token input; None: the action dim (openpi pads state to it)
    action_horizon: int = 50
    max_token_len: int = 48
    cameras: tuple[str, ...] = CAMERAS  # empty: state and prompt only (no SigLIP parameters at all)
    dtype: str = "float32"  # compute (activations, matmuls); "bfloat16" as openpi trains and serves
    param_dtype: str = "float32"  # stored parameters (float32 master weights; "bfloat16" for inference only)
    remat: str = "none"  # rematerialise each scanned layer in the backward pass with this jax.checkpoint_policies name

    @property
    def state_in_prompt(self) -> bool:
        """openpi's `discrete_state_input`: π₀.₅ reads its state from the prompt unless the config says otherwise."""
        return self.pi05 if self.discrete_state is None else self.discrete_state

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r}: choose one of {REMAT_POLICIES}")
        for f in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self.vlm, f) != getattr(self.expert, f):
                raise ValueError(
                    f"the two experts share attention, so their {f} must match: "
                    f"VLM {getattr(self.vlm, f)} vs action expert {getattr(self.expert, f)}"
                )
        if self.vlm.num_heads % self.vlm.num_kv_heads:
            raise ValueError(
                f"num_heads {self.vlm.num_heads} is not a multiple of num_kv_heads {self.vlm.num_kv_heads}"
            )


# What --remat may name: "none" (keep every activation) or a policy of what a layer's backward pass may keep
# (openpi: nothing_saveable, i.e. recompute each layer's forward in its backward pass; dots_*: keep matmul outputs).
REMAT_POLICIES = ("none", "nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


def remat(block: type[nn.Module], policy: str) -> type[nn.Module]:
    """`block` rematerialised under the named `jax.checkpoint_policies` policy ("none": `block` itself)."""
    if policy == "none":
        return block
    return nn.remat(block, prevent_cse=False, policy=getattr(jax.checkpoint_policies, policy))


_GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256)
_GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
_SO400M = SigLIPConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224)

PRESETS: dict[str, Pi0Config] = {
    "pi0": Pi0Config(vlm=_GEMMA_2B, expert=_GEMMA_300M, vit=_SO400M, pi05=False, max_token_len=48),
    "pi05": Pi0Config(vlm=_GEMMA_2B, expert=_GEMMA_300M, vit=_SO400M, pi05=True, max_token_len=200),
    # The CPU preset: the same code paths at a size a laptop CPU trains.
    "cpu": Pi0Config(
        vlm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32),
        expert=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32),
        vit=SigLIPConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, image_size=32),
        vocab_size=128,
        action_dim=2,
        state_dim=10,
        action_horizon=5,
        max_token_len=12,
        cameras=(),
    ),
}


def train_precision(config: Pi0Config, precision: str | None = None, remat: str | None = None) -> dict[str, str]:
    """The config fields of training: float32 parameters computed in `precision`, layers rematerialised under `remat`;
    None: openpi's choice for a full-size π₀ (bfloat16, nothing_saveable), float32 without remat for smaller ones."""
    full = config.vlm.width >= 1024
    precision = precision or ("bfloat16" if full else "float32")
    return {"dtype": precision, "param_dtype": "float32", "remat": remat or ("nothing_saveable" if full else "none")}


def make_config(preset: str, **overrides: Any) -> Pi0Config:
    """A preset with fields replaced, e.g. `make_config("cpu", action_dim=7, cameras=("base_0_rgb",))`."""
    if preset not in PRESETS:
        raise RunError(f"unknown π₀ preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


# ----------------------------------------------------------------------------------------------------------- Gemma
def _name(name: str, i: int) -> str:
    return name if i == 0 else f"{name}_{i}"  # openpi names the action expert's parameters `<name>_1`


def _init(in_axis, out_axis, batch_axis=()):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis, out_axis, batch_axis)


class RMSNorm(nn.Module):
    """RMSNorm `x * (1 + scale)`; with a condition (π₀.₅'s action expert) adaRMS: scale, shift and a residual gate."""

    @nn.compact
    def __call__(self, x, cond):
        dtype = x.dtype
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normed = x * jnp.reciprocal(jnp.sqrt(var + 1e-6))  # float32
        if cond is None:
            scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
            return (normed * (1 + scale)).astype(dtype), None
        mod = nn.Dense(x.shape[-1] * 3, kernel_init=nn.initializers.zeros, dtype=dtype, name="Dense_0")(cond)
        scale, shift, gate = jnp.split(mod[..., None, :], 3, axis=-1)  # [B,1,W] each
        return (normed * (1 + scale) + shift).astype(dtype), gate


def rope(x, positions, max_wavelength: float = 10_000.0):
    """Rotary embedding on split halves. x [B,T,N,E], positions [B,T]."""
    freq = (2.0 / x.shape[-1]) * jnp.arange(x.shape[-1] // 2, dtype=jnp.float32)
    radians = positions[..., None] / (max_wavelength**freq)[None, None, :]
    radians = radians[..., None, :]  # [B,T,1,E/2]
    sin, cos = jnp.sin(radians), jnp.cos(radians)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Einsum(nn.Module):
    """A weight `w` applied with an einsum equation (openpi's gemma stores attention weights this way)."""

    shape: tuple[int, ...]
    init: Any

    @nn.compact
    def __call__(self, eqn: str, x):
        return jnp.einsum(eqn, x, self.param("w", self.init, self.shape).astype(x.dtype))


class Attention(nn.Module):
    """Multi-query attention computed jointly over the token groups of all experts (each with its own projections).
    Without a cache: `mask` [B,T,T]. With `cache=(k, v, prefix_mask)` ([Bc,P,K,E] ×2, [Bc,P]) the tokens belong to
    Bc·N rows, each attending to its row's prefix (broadcast) and to its own tokens through `mask` [Bc·N,T,T]."""

    configs: Sequence[GemmaConfig]

    @nn.compact
    def __call__(self, xs, positions, mask, cache):
        c0 = self.configs[0]
        dtype = next(x.dtype for x in xs if x is not None)
        qs, ks, vs = [], [], []
        for i, (x, c) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                continue
            if c.num_kv_heads == c.num_heads:
                qkv = Einsum((3, c.num_heads, c.width, c.head_dim), _init(2, (1, 3), 0), name=_name("qkv_einsum", i))
                q, k, v = qkv("BTD,SNDH->SBTNH", x)
            else:
                q = Einsum((c.num_heads, c.width, c.head_dim), _init(1, (0, 2)), name=_name("q_einsum", i))(
                    "BTD,NDH->BTNH", x
                )
                kv = Einsum((2, c.num_kv_heads, c.width, c.head_dim), _init(2, (1, 3), 0), name=_name("kv_einsum", i))
                k, v = kv("BSD,2KDH->2BSKH", x)
            qs.append(q), ks.append(k), vs.append(v)
        q, k, v = (jnp.concatenate(t, axis=1) for t in (qs, ks, vs))
        q = rope(q, positions) * c0.head_dim**-0.5
        k = rope(k, positions)
        new_kv = (k, v)

        B, T, _, E = q.shape
        K, G = c0.num_kv_heads, c0.num_heads // c0.num_kv_heads
        big_neg = -2.3819763e38
        if cache is None:
            q = q.reshape(B, T, K, G, E)
            logits = jnp.einsum("BTKGE,BSKE->BKGTS", q, k, preferred_element_type=jnp.float32)
            logits = jnp.where(mask[:, None, None], logits, big_neg)
            probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
            out = jnp.einsum("BKGTS,BSKE->BTKGE", probs, v)
        else:
            ck, cv, cmask = cache
            Bc, P = cmask.shape
            N = B // Bc
            qn = q.reshape(Bc, N, T, K, G, E)
            lp = jnp.einsum("BNTKGE,BPKE->BNKGTP", qn, ck, preferred_element_type=jnp.float32)
            ls = jnp.einsum("BNTKGE,BNSKE->BNKGTS", qn, k.reshape(Bc, N, T, K, E), preferred_element_type=jnp.float32)
            lp = jnp.where(cmask[:, None, None, None, None, :], lp, big_neg)
            ls = jnp.where(mask.reshape(Bc, N, 1, 1, T, T), ls, big_neg)
            probs = jax.nn.softmax(jnp.concatenate([lp, ls], axis=-1), axis=-1).astype(dtype)
            out = jnp.einsum("BNKGTP,BPKE->BNTKGE", probs[..., :P], cv)
            out = out + jnp.einsum("BNKGTS,BNSKE->BNTKGE", probs[..., P:], v.reshape(Bc, N, T, K, E))
        out = out.reshape(B, T, K * G, E)

        outs, start = [], 0
        for i, (x, c) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                outs.append(None)
                continue
            proj = Einsum((c.num_heads, c.head_dim, c.width), _init((0, 1), 2), name=_name("attn_vec_einsum", i))
            outs.append(proj("BTNH,NHD->BTD", out[:, start : start + x.shape[1]]))
            start += x.shape[1]
        return outs, new_kv


class FeedForward(nn.Module):
    """GeGLU MLP (tanh GELU), openpi's `gating_einsum` [2,W,F] and `linear` [F,W]."""

    width: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        w_gate = self.param("gating_einsum", _init(1, 2, 0), (2, self.width, self.hidden)).astype(x.dtype)
        w_out = self.param("linear", _init(0, 1), (self.hidden, self.width)).astype(x.dtype)
        return jnp.dot(nn.gelu(jnp.dot(x, w_gate[0])) * jnp.dot(x, w_gate[1]), w_out)


def _gated_residual(x, y, gate):
    if x is None:
        return None
    return x + y if gate is None else x + y * gate


class Block(nn.Module):
    """One transformer layer for both experts: pre-norm attention (shared) and pre-norm MLPs (per expert)."""

    configs: Sequence[GemmaConfig]

    @nn.compact
    def __call__(self, xs, cache, positions, mask, adarms_cond):
        normed, gates = [], []
        for i, x in enumerate(xs):
            n, g = RMSNorm(name=_name("pre_attention_norm", i))(x, adarms_cond[i]) if x is not None else (None, None)
            normed.append(n), gates.append(g)
        attn, kv = Attention(self.configs, name="attn")(normed, positions, mask, cache)
        xs = [_gated_residual(x, y, g) for x, y, g in zip(xs, attn, gates, strict=True)]
        out = []
        for i, (x, c) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                out.append(None)
                continue
            n, g = RMSNorm(name=_name("pre_ffw_norm", i))(x, adarms_cond[i])
            out.append(_gated_residual(x, FeedForward(c.width, c.mlp_dim, name=_name("mlp", i))(n), g))
        return out, kv


class Embedder(nn.Module):
    vocab_size: int
    width: int

    @nn.compact
    def __call__(self, tokens):
        return self.param("input_embedding", _init(1, 0), (self.vocab_size, self.width))[tokens]


class Gemma(nn.Module):
    """Two Gemma experts over one stack of scanned layers (parameters stacked on axis 0, as openpi stores them)."""

    configs: Sequence[GemmaConfig]
    vocab_size: int
    remat: str = "none"

    def setup(self):
        self.embedder = Embedder(self.vocab_size, self.configs[0].width)
        self.layers = nn.scan(
            remat(Block, self.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.configs[0].depth,
        )(self.configs)
        self.final_norm = RMSNorm()
        self.final_norm_1 = RMSNorm()

    def embed(self, tokens, dtype):
        return self.embedder(tokens).astype(dtype) * jnp.sqrt(self.configs[0].width).astype(dtype)

    def __call__(self, xs, positions, mask, adarms_cond, cache=None):
        """xs: per-expert token lists (None to skip an expert). cache: per-layer (k [D,...], v [D,...]), prefix mask."""
        layer_cache = None
        if cache is not None:  # the prefix mask is the same for every layer: give each scanned layer its copy
            layer_cache = (cache[0], cache[1], jnp.broadcast_to(cache[2], (cache[0].shape[0], *cache[2].shape)))
        xs, kv = self.layers(xs, layer_cache, positions, mask, adarms_cond)
        norms = (self.final_norm, self.final_norm_1)
        return [None if x is None else norms[i](x, adarms_cond[i])[0] for i, x in enumerate(xs)], kv


# ----------------------------------------------------------------------------------------------------------- SigLIP
class EncoderBlock(nn.Module):
    cfg: SigLIPConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, _):
        y = nn.LayerNorm(name="LayerNorm_0", dtype=self.dtype)(x)
        y = nn.MultiHeadDotProductAttention(
            self.cfg.num_heads, dtype=self.dtype, deterministic=True, name="MultiHeadDotProductAttention_0"
        )(y, y)
        x = x + y
        y = nn.LayerNorm(name="LayerNorm_1", dtype=self.dtype)(x)
        return x + MlpBlock(self.cfg.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y), None


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="Dense_1")(y)


class Encoder(nn.Module):
    cfg: SigLIPConfig
    dtype: Any
    remat: str = "none"

    @nn.compact
    def __call__(self, x):
        block = remat(EncoderBlock, self.remat)
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.cfg.depth)(
            self.cfg, self.dtype, name="encoderblock"
        )(x, None)
        return nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)


class SigLIP(nn.Module):
    """SigLIP ViT (patch embedding, learned positions, pre-LN blocks) and a `head` projection to the VLM width."""

    cfg: SigLIPConfig
    out_width: int
    dtype: Any
    remat: str = "none"

    @nn.compact
    def __call__(self, image):  # [B,h,w,3] in [-1,1] -> [B,(h/p)(w/p),W_vlm]
        p = self.cfg.patch_size
        x = nn.Conv(self.cfg.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="embedding")(image)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        pos = self.param("pos_embedding", nn.initializers.normal(1 / math.sqrt(c)), (1, h * w, c))
        x = Encoder(self.cfg, self.dtype, self.remat, name="Transformer")(x + pos.astype(x.dtype))
        return nn.Dense(self.out_width, dtype=self.dtype, name="head")(x)


class PaliGemma(nn.Module):
    config: Pi0Config

    def setup(self):
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        if c.cameras:
            self.img = SigLIP(c.vit, c.vlm.width, dtype, c.remat)
        self.llm = Gemma((c.vlm, c.expert), c.vocab_size, c.remat)


# ----------------------------------------------------------------------------------------------------------- π₀
@flax.struct.dataclass
class Observation:
    """Model inputs. images/image_masks: {camera: [B,h,w,3] float in [-1,1]} / {camera: [B] bool}."""

    images: dict[str, jax.Array]
    image_masks: dict[str, jax.Array]
    state: jax.Array  # [B,S] normalised, zero-padded to the state dim (the action dim for openpi checkpoints)
    tokens: jax.Array  # [B,L] int32
    token_mask: jax.Array  # [B,L] bool


@flax.struct.dataclass
class Prefix:
    """What one VLM pass over an observation leaves for everything downstream."""

    k: jax.Array  # [D,B,P,K,E] keys of every layer (after RoPE)
    v: jax.Array  # [D,B,P,K,E]
    mask: jax.Array  # [B,P] valid prefix tokens
    features: jax.Array  # [B,W] mean of the VLM's final-normed outputs over valid prefix tokens
    state: jax.Array  # [B,S_state] the normalised state padded to the model's state dim (π₀'s state token reads it)


def make_attn_mask(input_mask, ar_mask):
    """Prefix-LM rule: token i attends to j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are valid. -> [B,T,T]."""
    cum = jnp.cumsum(jnp.broadcast_to(ar_mask, input_mask.shape).astype(jnp.int32), axis=1)
    return (cum[:, None, :] <= cum[:, :, None]) & (input_mask[:, None, :] & input_mask[:, :, None])


def posemb_sincos(pos, dim: int, min_period: float = 4e-3, max_period: float = 4.0):
    """Sin-cos embedding of the flow time t ∈ [0,1]. pos [B] -> [B,dim]."""
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    x = jnp.einsum("i,j->ij", pos, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


class Pi0Module(nn.Module):
    config: Pi0Config

    def setup(self):
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        self.PaliGemma = PaliGemma(c)
        w = c.expert.width
        self.action_in_proj = nn.Dense(w, dtype=dtype)
        self.action_out_proj = nn.Dense(c.action_dim, dtype=dtype)
        if c.pi05:
            self.time_mlp_in, self.time_mlp_out = nn.Dense(w, dtype=dtype), nn.Dense(w, dtype=dtype)
        else:
            self.state_proj = nn.Dense(w, dtype=dtype)
            self.action_time_mlp_in, self.action_time_mlp_out = nn.Dense(w, dtype=dtype), nn.Dense(w, dtype=dtype)

    def embed_prefix(self, obs: Observation):
        dtype = jnp.dtype(self.config.dtype)
        tokens, masks = [], []
        for cam in self.config.cameras:  # masked cameras stay in the sequence; attention ignores them
            t = self.PaliGemma.img(obs.images[cam].astype(dtype))
            tokens.append(t), masks.append(jnp.broadcast_to(obs.image_masks[cam][:, None], t.shape[:2]))
        tokens.append(self.PaliGemma.llm.embed(obs.tokens, dtype))
        masks.append(obs.token_mask)
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1)  # [B,P,W], [B,P]; ar all False

    def embed_suffix(self, state, x_t, time):
        """state [B,A], x_t [B,H,A], time [B] -> tokens [B,S,W], ar_mask [S], adaRMS condition or None."""
        dtype = jnp.dtype(self.config.dtype)
        H = x_t.shape[1]
        action_tokens = self.action_in_proj(x_t.astype(dtype))
        time_emb = posemb_sincos(time, self.config.expert.width).astype(dtype)
        if self.config.pi05:
            cond = nn.swish(self.time_mlp_out(nn.swish(self.time_mlp_in(time_emb))))
            return action_tokens, jnp.array([True] + [False] * (H - 1)), cond
        state_token = self.state_proj(state.astype(dtype))[:, None, :]
        time_tokens = jnp.broadcast_to(time_emb[:, None, :], action_tokens.shape)
        h = self.action_time_mlp_out(
            nn.swish(self.action_time_mlp_in(jnp.concatenate([action_tokens, time_tokens], -1)))
        )
        return jnp.concatenate([state_token, h], axis=1), jnp.array([True, True] + [False] * (H - 1)), None

    def prefix(self, obs: Observation) -> Prefix:
        tokens, mask = self.embed_prefix(obs)
        positions = jnp.cumsum(mask, axis=1) - 1
        attn = make_attn_mask(mask, jnp.zeros(mask.shape[1], bool))
        (out, _), (k, v) = self.PaliGemma.llm([tokens, None], positions, attn, [None, None])
        m = mask[..., None].astype(jnp.float32)
        feats = (out.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        return Prefix(k=k, v=v, mask=mask, features=feats, state=obs.state)

    def velocity(self, prefix: Prefix, x_t, time):
        """Action-expert velocity over a cached prefix. x_t [B·N,H,A], time [B·N] (N candidates per row)."""
        H = x_t.shape[1]
        n = x_t.shape[0] // prefix.mask.shape[0]
        state = jnp.repeat(prefix.state, n, axis=0)
        tokens, ar, cond = self.embed_suffix(state, x_t, time)
        suffix_mask = jnp.ones(tokens.shape[:2], bool)
        positions = jnp.repeat(prefix.mask.sum(-1), n)[:, None] + jnp.cumsum(suffix_mask, axis=1) - 1
        attn = make_attn_mask(suffix_mask, ar)
        (_, out), _ = self.PaliGemma.llm(
            [None, tokens], positions, attn, [None, cond], cache=(prefix.k, prefix.v, prefix.mask)
        )
        out = out[:, -H:]
        return self.action_out_proj(out).astype(jnp.float32), out  # [B·N,H,A], action-expert outputs [B·N,H,W]

    def __call__(self, obs: Observation, x_t, time):
        """openpi's training pass, prefix and suffix in one sequence (init runs it: it touches every parameter).
        -> v_t [B,H,A], prefix_out [B,P,W]."""
        p_tokens, p_mask = self.embed_prefix(obs)
        s_tokens, s_ar, cond = self.embed_suffix(obs.state, x_t, time)
        s_mask = jnp.ones(s_tokens.shape[:2], bool)
        mask = jnp.concatenate([p_mask, s_mask], axis=1)
        ar = jnp.concatenate([jnp.zeros(p_mask.shape[1], bool), s_ar])
        positions = jnp.cumsum(mask, axis=1) - 1
        (p_out, s_out), _ = self.PaliGemma.llm([p_tokens, s_tokens], positions, make_attn_mask(mask, ar), [None, cond])
        return self.action_out_proj(s_out[:, -x_t.shape[1] :]).astype(jnp.float32), p_out


# ----------------------------------------------------------------------------------------------------------- API
class Pi0:
    """The functional API the scripts use. Every method is jittable; `params` is an openpi-layout nested dict."""

    def __init__(self, config: Pi0Config):
        self.config = config
        self.module = Pi0Module(config)

    def dummy_observation(self, batch: int = 1) -> Observation:
        c = self.config
        s = c.vit.image_size
        return Observation(
            images={cam: jnp.zeros((batch, s, s, 3), jnp.float32) for cam in c.cameras},
            image_masks={cam: jnp.ones((batch,), bool) for cam in c.cameras},
            state=jnp.zeros((batch, c.state_dim or c.action_dim), jnp.float32),
            tokens=jnp.zeros((batch, c.max_token_len), jnp.int32),
            token_mask=jnp.ones((batch, c.max_token_len), bool),
        )

    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters, initialised in one jitted call (op by op, a full π₀ compiles hundreds of tiny programs)."""
        c = self.config

        @jax.jit
        def init(rng):
            x = jnp.zeros((1, c.action_horizon, c.action_dim), jnp.float32)
            params = self.module.init(rng, self.dummy_observation(1), x, jnp.ones((1,)))["params"]
            return jax.tree.map(lambda p: p.astype(c.param_dtype), params) if c.param_dtype != "float32" else params

        return init(rng)

    def prefix(self, params: Params, obs: Observation) -> Prefix:
        """One VLM pass: the KV cache of every layer and the pooled prefix features [B,W]."""
        return self.module.apply({"params": params}, obs, method=Pi0Module.prefix)

    def velocity(self, params: Params, prefix: Prefix, x_t: jax.Array, time: jax.Array):
        """v(x_t, t) for N candidates per observation. x_t [B,N,H,A], time [B,N] -> v [B,N,H,A], out [B,N,H,W]."""
        B, N, H, A = x_t.shape
        v, out = self.module.apply(
            {"params": params}, prefix, x_t.reshape(B * N, H, A), time.reshape(B * N), method=Pi0Module.velocity
        )
        return v.reshape(B, N, H, A), out.reshape(B, N, H, -1)

    def flow_loss(
        self,
        params: Params,
        obs_or_prefix: Observation | Prefix,
        actions: jax.Array,
        rng: jax.Array,
        *,
        noise: jax.Array | None = None,
        time: jax.Array | None = None,
    ):
        """Flow-matching loss per step, [B,H] (openpi): t ~ Beta(1.5,1)·0.999+0.001, x_t = t·ε + (1−t)·a, target ε − a.
        A Prefix reuses a VLM pass (a stopped one: a frozen backbone, no VLM backward pass)."""
        prefix = obs_or_prefix if isinstance(obs_or_prefix, Prefix) else self.prefix(params, obs_or_prefix)
        k_noise, k_time = jax.random.split(rng)
        B = actions.shape[0]
        noise = jax.random.normal(k_noise, actions.shape) if noise is None else noise
        time = jax.random.beta(k_time, 1.5, 1.0, (B,)) * 0.999 + 0.001 if time is None else time
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        v_t, _ = self.velocity(params, prefix, x_t[:, None], time[:, None])
        return jnp.mean(jnp.square(v_t[:, 0] - (noise - actions)), axis=-1)

    def sample(self, params: Params, prefix: Prefix, noise: jax.Array, num_steps: int = 10) -> jax.Array:
        """Euler integration from t=1 (noise [B,N,H,A]) to t=0 (actions [B,N,H,A]), t ← t + δ as openpi's sampler."""
        B, N = noise.shape[:2]
        dt = -1.0 / num_steps

        def step(carry, _):
            x, t = carry
            v, _ = self.velocity(params, prefix, x, jnp.full((B, N), t))
            return (x + dt * v, t + dt), None

        (x, _), _ = jax.lax.scan(step, (noise, jnp.float32(1.0)), length=num_steps)
        return x

    def sample_n(self, params: Params, prefix: Prefix, rng: jax.Array, n: int, num_steps: int) -> jax.Array:
        """n chunks per observation from one prefix, standard-normal noise drawn from `rng` -> [B,n,H,A]."""
        c = self.config
        noise = jax.random.normal(rng, (prefix.mask.shape[0], n, c.action_horizon, c.action_dim))
        return self.sample(params, prefix, noise, num_steps)

    def sample_scored(
        self, params: Params, prefix: Prefix, rng: jax.Array, n: int, steps: int, score: Callable, slice_: int = 0
    ) -> tuple[jax.Array, Any]:
        """`sample_n` in slices of `slice_` candidates (0: all at once) under `lax.map`, each slice scored (`score`:
        [B,S,H,A] -> pytree of [B,S,...]) when sampled, so memory holds one -> chunks [B,n,H,A], scores [B,n,...]."""
        S = slice_ or n

        def part(key):
            chunks = self.sample_n(params, prefix, key, S, steps)
            return chunks, score(chunks)

        out = jax.lax.map(part, jax.random.split(rng, n // S))  # [n/S,B,S,...]
        return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n, *x.shape[3:]), out)

    def sample_logp(
        self, params: Params, prefix: Prefix, noise: jax.Array, steps: int, rng: jax.Array, hutchinson: bool
    ):
        """`sample` with each sample's log-density by the change of variables along the flow: log π(A) = log N(x_1) +
        (1/K) Σ_k tr ∂v/∂x (x_k, t_k) -> (A [B,N,H,A], log π [B,N]). Exact trace: one JVP per coordinate;
        Hutchinson: E[εᵀ J ε] with Rademacher ε."""
        B, N, H, A = noise.shape
        dt = -1.0 / steps

        def step(carry, key):
            x, t, tr_sum = carry
            f = lambda y: self.velocity(params, prefix, y, jnp.full((B, N), t))[0]  # noqa: E731
            if hutchinson:
                eps = jax.random.rademacher(key, x.shape, jnp.float32)
                v, jv = jax.jvp(f, (x,), (eps,))
                tr = (eps * jv).sum((-2, -1))
            else:
                basis = jnp.eye(H * A, dtype=jnp.float32).reshape(H * A, H, A)
                v, jv = jax.vmap(lambda e: jax.jvp(f, (x,), (jnp.broadcast_to(e, x.shape),)))(basis)  # [HA,B,N,H,A]
                v = v[0]
                tr = jnp.einsum("dbnha,dha->bn", jv, basis)
            return (x + dt * v, t + dt, tr_sum + tr), None

        keys = jax.random.split(rng, steps)
        (x, _, tr_sum), _ = jax.lax.scan(step, (noise, jnp.float32(1.0), jnp.zeros((B, N))), keys)
        log_n = -0.5 * (noise**2).sum((-2, -1)) - 0.5 * H * A * math.log(2 * math.pi)
        return x, log_n + tr_sum / steps

    def optimizer_labels(self, params: Params, label: str, freeze_backbone: bool) -> Params:
        """`label` on every parameter; with `freeze_backbone` "frozen" on the VLM's (SigLIP, embedder, expert 0), for
        `optax.multi_transform`."""

        def is_backbone(path) -> bool:
            keys = [getattr(p, "key", str(p)) for p in path]
            if keys[0] != "PaliGemma":
                return False
            if keys[1] == "img" or keys[2] == "embedder":
                return True
            return not any(re.search(r"_1$", k) for k in keys[2:])

        frozen = lambda path, _: "frozen" if freeze_backbone and is_backbone(path) else label
        return jax.tree_util.tree_map_with_path(frozen, params)


def param_count(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def trained_part(params: Params, labels: Params | None = None) -> Params:
    """The leaves of `params` that train, nested as in `params`: all of them without `labels`, else those whose label
    (`Pi0.optimizer_labels`) is not "frozen". What an average of the weights (--ema-decay) needs to keep."""
    if labels is None:
        return params
    flat, kind = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(labels)
    return flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if kind[k] != "frozen"})


def overlaid(params: Params, part: Params) -> Params:
    """`params` with the leaves of `part` (a `trained_part`, e.g. the averaged weights) in their place."""
    flat = flax.traverse_util.flatten_dict(params)
    flat.update(flax.traverse_util.flatten_dict(part))
    return flax.traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------------------- inputs
def resize_with_pad(images: jax.Array, height: int, width: int) -> jax.Array:
    """Resize [B,h,w,3] keeping the aspect ratio, then pad to [B,height,width,3] (openpi's image_tools rule)."""
    b, h, w, c = images.shape
    if (h, w) == (height, width):
        return images
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    out = jax.image.resize(images.astype(jnp.float32), (b, rh, rw, c), method="linear")
    if images.dtype == jnp.uint8:
        out, pad_value = jnp.round(out).clip(0, 255).astype(jnp.uint8), 0
    else:
        out, pad_value = out.clip(-1.0, 1.0), -1.0
    ph, pw = height - rh, width - rw
    return jnp.pad(out, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), constant_values=pad_value)


def normalize(x: jax.Array, stats: dict[str, Any] | None, quantile: bool = False) -> jax.Array:
    """openpi's normalisation: (x−mean)/(std+1e-6), or with quantiles to [-1,1]. Extra dims beyond the stats pass."""
    if stats is None:
        return x
    d = len(stats["mean"])
    if quantile:
        head = (x[..., :d] - stats["q01"]) / (stats["q99"] - stats["q01"] + 1e-6) * 2.0 - 1.0
    else:
        head = (x[..., :d] - stats["mean"]) / (stats["std"] + 1e-6)
    return jnp.concatenate([head, x[..., d:]], axis=-1) if x.shape[-1] > d else head


def unnormalize(x: jax.Array, stats: dict[str, Any] | None, quantile: bool = False) -> jax.Array:
    if stats is None:
        return x
    d = len(stats["mean"])
    if quantile:
        head = (x[..., :d] + 1.0) / 2.0 * (stats["q99"] - stats["q01"] + 1e-6) + stats["q01"]
    else:
        head = x[..., :d] * (stats["std"] + 1e-6) + stats["mean"]
    return jnp.concatenate([head, x[..., d:]], axis=-1) if x.shape[-1] > d else head


STATE_BINS = 256  # openpi's π₀.₅ discretises each normalised state dim into 256 bins over [-1, 1]
BIN_VALUES = range(-1, STATE_BINS)  # np.digitize writes -1 for a state below -1


def discretize_state(state: jax.Array) -> jax.Array:
    """openpi's `np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1` in JAX: [..., S] -> int32 bins in [-1, 255]
    (the edges k/128 − 1 are exact in float32)."""
    edges = jnp.arange(STATE_BINS, dtype=jnp.float32) / (STATE_BINS / 2) - 1.0
    return (jnp.searchsorted(edges, state.astype(jnp.float32), side="right") - 1).astype(jnp.int32)


@flax.struct.dataclass
class PromptTable:
    """Every instruction tokenised once; observations carry `prompt_id` into it. tokens/mask [P,L]. With the state in
    the prompt (π₀.₅): `tokens` is each prompt's part before the state, and `bins` [2,257,M] / `bin_len` [2,257] the
    ids of every bin value b ∈ [-1, 255] (row b+1) as a middle dim ([0]) and as the last ([1]), for `state_prompt`."""

    tokens: jax.Array
    mask: jax.Array
    bins: jax.Array | None = None
    bin_len: jax.Array | None = None


def state_prompt(table: PromptTable, pid: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """π₀.₅'s prompt with the state, in jit: [B] prompt ids, [B,S] normalised state -> tokens [B,L], mask [B,L]: the
    prompt's prefix, then each dim's bin tokens scattered to their offsets; tokens past L dropped (as openpi)."""
    B, S = state.shape
    L, M = table.tokens.shape[1], table.bins.shape[-1]
    row = discretize_state(state) + 1  # [B,S] row of each bin value in the tables
    last = (jnp.arange(S) == S - 1).astype(jnp.int32)  # [S] which table: middle or last dim
    seg = table.bins[last[None, :], row]  # [B,S,M]
    seg_len = table.bin_len[last[None, :], row]  # [B,S]
    prefix_len = table.mask[pid].sum(-1)  # [B]
    start = prefix_len[:, None] + jnp.cumsum(seg_len, axis=1) - seg_len  # [B,S] where each dim's tokens begin
    pos = start[..., None] + jnp.arange(M)  # [B,S,M]
    pos = jnp.where(jnp.arange(M) < seg_len[..., None], pos, L)  # padding of the tables goes out of range: dropped
    tokens = table.tokens[pid].at[jnp.arange(B)[:, None, None], pos].set(seg, mode="drop")
    mask = jnp.arange(L)[None] < (prefix_len + seg_len.sum(-1))[:, None]
    return tokens, mask


def make_observation(
    config: Pi0Config,
    obs: dict[str, Any],
    prompts: PromptTable,
    state_stats: dict[str, Any] | None = None,
    quantile: bool = False,
) -> Observation:
    """An observation batch -> π₀ inputs (jittable): images resized with padding and scaled to [-1,1] (missing cameras
    black and masked), the state normalised with `state_stats` and zero-padded, the prompt from the table."""
    state = normalize(jnp.asarray(obs["state"], jnp.float32), state_stats, quantile)
    state_dim = config.state_dim or config.action_dim
    if state.shape[-1] > state_dim:
        raise ValueError(
            f"the observation's state has {state.shape[-1]} dims but the model takes {state_dim} "
            "(set state_dim in the π₀ config, or use a checkpoint made for this robot)"
        )
    pid = jnp.asarray(obs["prompt_id"], jnp.int32)
    if prompts.bins is None:
        tokens, token_mask = prompts.tokens[pid], prompts.mask[pid]
    else:  # π₀.₅: the normalised state (the env's dims, before padding, as openpi) written into the prompt
        tokens, token_mask = state_prompt(prompts, pid, state)
    state = jnp.pad(state, ((0, 0), (0, state_dim - state.shape[-1])))
    B, s = state.shape[0], config.vit.image_size
    images, masks = {}, {}
    for cam in config.cameras:
        if cam in obs.get("images", {}):
            img = resize_with_pad(jnp.asarray(obs["images"][cam]), s, s)
            images[cam] = img.astype(jnp.float32) / 127.5 - 1.0 if img.dtype == jnp.uint8 else img.astype(jnp.float32)
            masks[cam] = jnp.ones((B,), bool)
        else:
            images[cam], masks[cam] = -jnp.ones((B, s, s, 3), jnp.float32), jnp.zeros((B,), bool)
    return Observation(images=images, image_masks=masks, state=state, tokens=tokens, token_mask=token_mask)


class EnvIO:
    """Between an env and π₀: observations to π₀ inputs, chunks from env units [..., H, A] to π₀'s normalised,
    zero-padded [..., H_m, A_m] and back (`quantile`: π₀.₅'s normalisation; `delta`: dims relative to the state, as
    openpi's pi0_libero). `horizon` H of π₀'s H_m steps are executed, the rest discarded (openpi's `replan_steps`)."""

    def __init__(
        self,
        config: Pi0Config,
        table: PromptTable,
        stats: dict,
        action_dim: int,
        delta: int = 0,
        quantile: bool = False,
        horizon: int | None = None,
    ):
        self.config, self.table, self.action_dim = config, table, action_dim
        self.delta, self.quantile = delta, quantile
        self.horizon = horizon or config.action_horizon
        if not 1 <= self.horizon <= config.action_horizon:
            raise ValueError(
                f"{self.horizon} executed actions per chunk but π₀'s chunk has {config.action_horizon}: pass "
                f"--action-horizon between 1 and --model-horizon ({config.action_horizon})"
            )
        self.stats = jax.tree.map(jnp.asarray, stats)

    def observe(self, obs: dict[str, Any]) -> Observation:
        """{"state": [B,S], "prompt_id": [B], "images": {...}} -> π₀ inputs."""
        return make_observation(self.config, obs, self.table, self.stats["state"], self.quantile)

    def to_model(self, actions: jax.Array, state: jax.Array | None = None) -> jax.Array:
        """Env-unit chunks [..., H, A] -> normalised, zero-padded [..., H_m, A_m], relative to `state` when given."""
        off = 0.0 if state is None else state_offset(state, self.action_dim, self.delta)
        a = normalize(actions - off, self.stats["actions"], self.quantile)
        pad_t = self.config.action_horizon - a.shape[-2]  # executed chunks [.., H, A]: discarded steps are 0
        return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad_t), (0, self.config.action_dim - a.shape[-1])])

    def to_env(self, actions: jax.Array, state: jax.Array) -> jax.Array:
        """π₀'s chunk [B,H_m,A_m] -> the executed part in env units [B,H,A], the state [B,S] added on the delta dims."""
        a = unnormalize(self.executed(actions), self.stats["actions"], self.quantile)
        return a + state_offset(state, self.action_dim, self.delta)

    def executed(self, chunks: jax.Array) -> jax.Array:
        """The part of π₀'s (normalised) chunks [..., H_m, A_m] that reaches the env: [..., H, A] (critics read it)."""
        return chunks[..., : self.horizon, : self.action_dim]

    def step_weights(self, w: jax.Array) -> jax.Array:
        """Per-step weights of executed chunks [B,H] -> [B,H_m] for `Pi0.flow_loss`: 0 on the discarded steps."""
        return jnp.pad(w, [(0, 0), (0, self.config.action_horizon - w.shape[-1])])

    def executed_mask(self) -> jax.Array:
        """[H_m, A_m] float: 1 on the executed steps' env dims, 0 on discarded steps and padded dims."""
        h, a = jnp.arange(self.config.action_horizon)[:, None], jnp.arange(self.config.action_dim)[None]
        return ((h < self.horizon) & (a < self.action_dim)).astype(jnp.float32)


def sample_env_actions(model: Pi0, io: EnvIO, params: Params, obs: dict, rng: jax.Array, steps: int, noise_scale=1.0):
    """π₀'s chunks for env observations, the executed part in env units [B,H,A] (jittable): one prefix pass, then
    `steps` Euler steps from noise_scale·N(0, I) (0: the deterministic mean-noise policy)."""
    c = model.config
    prefix = model.prefix(params, io.observe(obs))
    noise = noise_scale * jax.random.normal(rng, (prefix.mask.shape[0], 1, c.action_horizon, c.action_dim))
    return io.to_env(model.sample(params, prefix, noise, steps)[:, 0], obs["state"])


def state_offset(state: Any, action_dim: int, dims: int) -> Any:
    """What to add to a chunk predicted relative to the state: [..., S] -> [..., 1, A], the first `dims` state entries
    (zero beyond); 0.0 when dims = 0. numpy or jax."""
    if not dims:
        return 0.0
    return state[..., None, :action_dim] * (np.arange(action_dim) < dims)


# ----------------------------------------------------------------------------------------------------------- tokenizers
def _clean(text: str) -> str:
    return text.strip().replace("_", " ").replace("\n", " ")


def _pad(ids: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = ids[:max_len]  # openpi truncates too long prompts
    tokens = np.zeros(max_len, np.int32)
    tokens[: len(ids)] = ids
    return tokens, np.arange(max_len) < len(ids)


def _digitize(state: np.ndarray) -> np.ndarray:
    """openpi's bins of a normalised state on the host, as its tokenizer computes them: [S] -> ints in [-1, 255]."""
    return np.digitize(state, bins=np.linspace(-1, 1, STATE_BINS + 1)[:-1]) - 1


class BuiltinTokenizer:
    """A word-level tokenizer that needs no file (the CPU preset): common robot-task words have their own ids, other
    words hash (crc32) into the ids left; 0 pad, 1 BOS, 2 newline; the last 12 ids write π₀.₅'s state numbers."""

    WORDS = (
        "push pick place put open close turn on off the a an to in into onto of and at on top left right front "
        "back behind near next middle center block cube bowl plate mug cup drawer cabinet door stove basket "
        "box target red green blue yellow black white wooden ketchup bottle"
    ).split()
    NUMBER_IDS = 12  # "0".."9", "-", the separator between dims

    def __init__(self, max_len: int, vocab_size: int = 128):
        if vocab_size < len(self.WORDS) + self.NUMBER_IDS + 8:
            raise ValueError(
                f"vocab_size {vocab_size} too small for the built-in tokenizer "
                f"(needs ≥ {len(self.WORDS) + self.NUMBER_IDS + 8})"
            )
        self.max_len, self.vocab_size = max_len, vocab_size
        self.ids_of = {w: 3 + i for i, w in enumerate(self.WORDS)}
        first = vocab_size - self.NUMBER_IDS
        self.number_ids = {c: first + i for i, c in enumerate("0123456789-")} | {" ": vocab_size - 1}

    def _words(self, prompt: str) -> list[int]:
        base, n_hash = 3 + len(self.WORDS), self.vocab_size - 3 - len(self.WORDS) - self.NUMBER_IDS
        words = re.findall(r"[a-z0-9]+", _clean(prompt).lower())
        return [self.ids_of.get(w, base + zlib.crc32(w.encode()) % n_hash) for w in words]

    def _number(self, b: int, end: int) -> list[int]:
        return [self.number_ids[c] for c in str(b)] + [end]

    def ids(self, prompt: str, state: np.ndarray | None = None) -> list[int]:
        if state is None:
            return [1, *self._words(prompt), 2]
        bins = _digitize(state)
        numbers = [self._number(int(b), self.number_ids[" "]) for b in bins[:-1]] + [self._number(int(bins[-1]), 2)]
        return [1, *self._words(prompt), 2, *(i for n in numbers for i in n)]

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return _pad(self.ids(prompt, state), self.max_len)

    def state_prefix(self, prompt: str) -> list[int]:
        return [1, *self._words(prompt), 2]

    def state_bins(self) -> tuple[list[list[int]], list[list[int]]]:
        mid = [self._number(b, self.number_ids[" "]) for b in BIN_VALUES]
        return mid, [self._number(b, 2) for b in BIN_VALUES]


def make_tokenizer(path: str | None, config: Pi0Config) -> Any:
    """openpi's PaliGemma tokenizer at `path` (--tokenizer), or with None the built-in word tokenizer."""
    if path:
        from common.openpi import PaligemmaTokenizer

        return PaligemmaTokenizer(path, config.max_token_len)
    return BuiltinTokenizer(config.max_token_len, config.vocab_size)


def make_prompt_table(prompts: Sequence[str], tokenizer, state_in_prompt: bool = False) -> PromptTable:
    """Every prompt tokenised once. With `state_in_prompt` (π₀.₅): the parts `state_prompt` assembles, checked against
    the tokenizer's whole-string encoding so that a tokenizer that cannot be cut this way stops the run here."""
    if not state_in_prompt:
        toks, masks = zip(*(tokenizer.tokenize(p) for p in prompts), strict=True) if prompts else ((), ())
        return PromptTable(tokens=jnp.asarray(np.stack(toks)), mask=jnp.asarray(np.stack(masks)))
    toks, masks = [], []
    mid, last = tokenizer.state_bins()
    probe = np.append(np.linspace(-1, 1, STATE_BINS + 1)[:-1] + 1e-3, -1.5)  # a value in every bin, then bin -1
    for p in prompts:
        prefix = tokenizer.state_prefix(p)
        for end in (-1.5, 0.3, 1.0):  # the last dim: below the range, inside, and the top bin
            state = np.concatenate([probe, [end]]).astype(np.float32)
            bins = _digitize(state) + 1  # the table rows
            assembled = prefix + [i for b in bins[:-1] for i in mid[b]] + last[bins[-1]]
            if assembled != tokenizer.ids(p, state):
                raise RunError(
                    f"the tokenizer cannot write π₀.₅'s state into the prompt part by part (prompt {p!r}): its "
                    "encoding of a number depends on its neighbours; use openpi's paligemma_tokenizer.model, or "
                    "--discrete-state False if this checkpoint was trained without the state in its prompt"
                )
        t, m = _pad(prefix, tokenizer.max_len)
        toks.append(t), masks.append(m)
    width = max(len(x) for x in (*mid, *last))
    bins = np.zeros((2, len(mid), width), np.int32)
    for k, parts in enumerate((mid, last)):
        for i, ids in enumerate(parts):
            bins[k, i, : len(ids)] = ids
    lens = np.array([[len(x) for x in mid], [len(x) for x in last]], np.int32)
    return PromptTable(jnp.asarray(np.stack(toks)), jnp.asarray(np.stack(masks)), jnp.asarray(bins), jnp.asarray(lens))
