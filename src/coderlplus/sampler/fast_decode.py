"""A lean decoder for Llama-family models (Qwen2, Llama): the ``sampler=hf`` fast path.

Why: on a CPU, and for small models anywhere, ``model.generate`` spends most of a step in
per-token Python — a module call per projection, a mask built per step, a cache object per
layer — not in arithmetic. And it prefills every prompt ``n`` times (``num_return_sequences``
copies the prompt before the prefill). This decoder reads the same ``nn.Module`` parameters
(no copy; it sees every update) and runs the same maths as ``transformers``' Qwen2/Llama
forward as plain tensor ops:

- each distinct prompt is prefilled once, its keys/values copied to its ``n`` samples;
- keys/values live in one preallocated cache per layer (no concatenation per token);
- q/k/v and gate/up projections are one matrix multiply each (weights concatenated once
  per ``generate`` call);
- on a CPU with one torch thread and fp32 weights, each decode step runs every layer in one
  call of the native kernel ``kernels/smallm`` (norms, projections straight from the
  parameters, rotary, cache write, attention, MLP): no per-token tensor ops, and no weight is
  concatenated or prepacked; otherwise large projections are prepacked for oneDNN (``_pack``);
- decoding stops when every row has produced its end-of-sequence token.

Only configurations whose maths it reproduces are accepted (``supports``): RMSNorm, SiLU
MLP, default rotary embedding, full causal attention (no sliding window), optional q/k/v
bias (Qwen2), grouped-query attention. Anything else goes through ``model.generate``.
``tests/test_fast_decode.py`` checks greedy tokens and log-probs against ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.nn.functional as F

from coderlplus.kernels import smallm

ARCHITECTURES = ("qwen2", "llama")


def supports(model) -> str | None:
    """None when ``model`` can use the fast path, else the reason it cannot."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model_type {kind!r} is not one of {ARCHITECTURES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope_type {rope.get('rope_type')!r}"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "pretraining_tp", 1) != 1:
        return "mlp_bias / pretraining_tp"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "layer types other than full_attention"
    try:
        layer = model.model.layers[0]
        layer.self_attn.q_proj, layer.mlp.gate_proj, model.model.norm, model.lm_head  # noqa: B018
    except AttributeError as e:
        return f"unexpected module layout ({e})"
    return None


# smallm.DecodeLayerWeights field -> the parameter of a Qwen2/Llama decoder layer (biases may be None)
_NATIVE_PARAMS = {
    "norm1": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.o_proj.weight",
    "norm2": "post_attention_layernorm.weight",
    "wg": "mlp.gate_proj.weight",
    "wu": "mlp.up_proj.weight",
    "wd": "mlp.down_proj.weight",
}

_PACKABLE: dict[torch.dtype, bool] = {}  # dtype -> whether oneDNN's prepacked linear works here
# Smaller weights are not packed: for them the plain kernel is as fast (measured here, 8 rows:
# 512x512 fp32 74 -> 57 us per product packed, 1024x192 56 -> 48, 192x192 11 -> 20 us).
_PACK_MIN = 1 << 18


def _pack(w: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``w`` prepacked by oneDNN for ``rows`` input rows, or None where that is unavailable.

    A CPU matrix multiply with few rows repacks the whole weight into the kernel's blocked layout
    on every call; a decode step is such a call per projection, and for large weights the
    repacking costs as much as the product (measured here: 8 rows, the projections of a
    25M-parameter model, 13.5 -> 7.2 ms per token in fp32, 7.3 -> 4.1 ms in bf16; a whole
    ``generate`` 13 % / 20 % faster). Packing once per ``generate`` is what inductor's CPU
    freezing does, with the same private ops."""
    if w.device.type != "cpu" or w.numel() < _PACK_MIN or not torch.backends.mkldnn.is_available():
        return None
    if w.dtype not in _PACKABLE:  # probe once per dtype: present, and the same numbers
        try:
            g = torch.Generator().manual_seed(0)
            pw = torch.randn(24, 40, generator=g).to(w.dtype)
            x = torch.randn(3, 40, generator=g).to(w.dtype)
            got = torch.ops.mkldnn._linear_pointwise(
                x, torch.ops.mkldnn._reorder_linear_weight(pw, 3), None, "none", [], ""
            )
            _PACKABLE[w.dtype] = torch.allclose(got.float(), F.linear(x, pw).float(), rtol=1e-2, atol=1e-2)
        except (RuntimeError, AttributeError):
            _PACKABLE[w.dtype] = False
    return torch.ops.mkldnn._reorder_linear_weight(w, rows) if _PACKABLE[w.dtype] else None


class _Proj:
    """A projection of the decoder: weight, bias and how a decode step of ``rows`` rows multiplies
    by it on a CPU — the native small-row kernel (``kernels/smallm``: fp32, one thread, few rows),
    else the weight prepacked by oneDNN. Other row counts (the prefill's) use ``F.linear``.

    ``parts`` (instead of ``w``/``b``): the ``(weight, bias)`` of q/k/v or gate/up kept apart,
    for a layer that decodes with ``smallm.decode_layer`` (which reads them apart); then the
    prefill multiplies by each and concatenates the outputs, and no weight is copied."""

    __slots__ = ("b", "native", "packed", "parts", "rows", "w")

    def __init__(
        self,
        w: torch.Tensor | None,
        b: torch.Tensor | None,
        rows: int,
        pack: bool,
        native: bool = True,
        parts: list | None = None,
    ):
        self.w, self.b, self.rows, self.parts = w, b, rows, parts
        self.native = (
            parts is None
            and native
            and rows <= smallm.MAX_ROWS
            and w.numel() >= _PACK_MIN
            and smallm.usable(w, b)
        )
        self.packed = _pack(w, rows) if parts is None and pack and not self.native else None

    @property
    def dtype(self) -> torch.dtype:
        return (self.w if self.parts is None else self.parts[0][0]).dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts is not None:
            return torch.cat([F.linear(x, w, b) for w, b in self.parts], dim=-1)
        if self.native and x.shape[:-1].numel() == self.rows:
            return smallm.linear(x.reshape(self.rows, -1), self.w, self.b).view(*x.shape[:-1], -1)
        if self.packed is not None and x.shape[:-1].numel() == self.rows:
            y = torch.ops.mkldnn._linear_pointwise(
                x.reshape(self.rows, -1), self.packed, self.b, "none", [], ""
            )
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.w, self.b)


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: _Proj
    o: _Proj
    norm2: torch.Tensor
    gate_up: _Proj
    down: _Proj
    native: smallm.DecodeLayerWeights | None = None  # set: decode steps run in smallm.decode_layer


class FastDecoder:
    """Decode with the current weights of a Qwen2/Llama ``*ForCausalLM`` (see the module doc)."""

    def __init__(self, model, pack: bool = True, native: bool = True):
        """``pack``: prepack the projections for the decode steps where the CPU allows (see ``_pack``);
        ``native``: run decode steps through the native kernels where they can (one torch thread,
        fp32, at most ``smallm.MAX_ROWS`` rows, the kernel built: see ``kernels/smallm.py``)."""
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"the fast decoder does not support this model: {reason}")
        self.model, self.pack, self.native = model, pack, native
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        d = self.head_dim
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # as transformers

    # ------------------------------------------------------------------ weights

    def _weights(
        self, dtype: torch.dtype | None, rows: int
    ) -> tuple[torch.Tensor, list[_Layer], torch.Tensor, _Proj]:
        """The parameters the decoder reads, projections (LM head included) ready for decode steps
        of ``rows`` rows; the projections in ``dtype`` (a copy) when given — autocast's matmul
        precision. Embedding, norms and LM head stay in the parameters' dtype."""
        m = self.model

        def w_of(*ws):
            if dtype is None or dtype == ws[0].dtype:
                return torch.cat(ws) if len(ws) > 1 else ws[0]
            out = torch.empty(sum(len(w) for w in ws), *ws[0].shape[1:], dtype=dtype, device=ws[0].device)
            start = 0
            for w in ws:  # cast while concatenating: one pass over the weights
                out[start : start + len(w)].copy_(w)
                start += len(w)
            return out

        def native_layer(layer) -> smallm.DecodeLayerWeights | None:
            if not self.native or dtype not in (None, torch.float32) or rows > smallm.MAX_ROWS:
                return None
            params = {name: attrgetter(path)(layer) for name, path in _NATIVE_PARAMS.items()}
            return smallm.layer_weights(self.heads, **params)

        natives = [native_layer(layer) for layer in m.model.layers]
        apart = all(n is not None for n in natives)  # every layer decodes natively: no copies

        def proj(*ws, biases=None):
            biases = biases or [None] * len(ws)
            if apart:
                return _Proj(None, None, rows, False, parts=list(zip(ws, biases)))
            bias = None if biases[0] is None else w_of(*biases)
            return _Proj(w_of(*ws), bias, rows, self.pack, self.native)

        layers = []
        for layer, native in zip(m.model.layers, natives):
            at, mlp = layer.self_attn, layer.mlp
            layers.append(
                _Layer(
                    norm1=layer.input_layernorm.weight,
                    qkv=proj(
                        at.q_proj.weight,
                        at.k_proj.weight,
                        at.v_proj.weight,
                        biases=[at.q_proj.bias, at.k_proj.bias, at.v_proj.bias],
                    ),
                    o=proj(at.o_proj.weight),
                    norm2=layer.post_attention_layernorm.weight,
                    gate_up=proj(mlp.gate_proj.weight, mlp.up_proj.weight),
                    down=proj(mlp.down_proj.weight),
                    native=native if apart else None,
                )
            )
        lm_head = _Proj(m.lm_head.weight, None, rows, self.pack, self.native)
        return m.model.embed_tokens.weight, layers, m.model.norm.weight, lm_head

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # as Qwen2RMSNorm / LlamaRMSNorm
        if x.dtype == torch.float32:  # the same sums in one op
            return F.rms_norm(x, w.shape, w, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    def _rotary_tables(self, n: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[n, d]`` of positions ``0..n-1``: ``x * cos + roll(x) * sin`` is
        ``transformers``' ``x * cos + rotate_half(x) * sin`` (``rotate_half(x) = cat(-x2, x1)``)."""
        freqs = torch.arange(n, device=device, dtype=torch.float)[:, None] * self.inv_freq.to(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        sin[:, : sin.shape[1] // 2].neg_()
        return emb.cos().to(dtype), sin.to(dtype)

    # ------------------------------------------------------------------ forward

    def _forward(self, weights, ids, rotary, cache, start, key_mask):
        """Run tokens ``ids [B, L]`` (``rotary``: their cos/sin ``[B, L, 1, d]``) writing keys/values
        at cache slots ``start .. start+L``; attend to slots ``< start+L`` allowed by ``key_mask
        [B, 1, L, S]``. Returns the last position's final hidden state ``[B, H]``.

        Under autocast the projections' weights come in its dtype (``_weights``) and their inputs
        are cast to it, as autocast does; the residual stream, norms and rotary stay in the
        parameters' dtype. Attention gets the inputs autocast would give it (rounded to the
        projections' dtype) but computes in the parameters' dtype: for one query a bf16
        ``scaled_dot_product_attention`` is ~6x slower than an fp32 one on a CPU."""
        embed, layers, final_norm, _ = weights
        B, L = ids.shape
        H, K, d = self.heads, self.kv_heads, self.head_dim
        if L == 1 and layers[0].native is not None:
            return self._native_step(weights, ids, rotary, cache, start, key_mask)
        cos, sin = rotary
        x = F.embedding(ids, embed)
        end = start + L
        last = len(layers) - 1
        for i, w in enumerate(layers):
            cd = w.qkv.dtype  # the matmuls' dtype
            qkv = w.qkv(self._norm(x, w.norm1).to(cd)).view(B, L, H + 2 * K, d)
            qk = qkv[:, :, : H + K]  # queries and keys rotate together
            qk = qk * cos + qk.roll(d // 2, -1) * sin
            keys, values = cache[i]
            keys[:, :, start:end] = _round(qk[:, :, H:], cd).transpose(1, 2)
            values[:, :, start:end] = qkv[:, :, H + K :].transpose(1, 2)
            q, mask = qk[:, :, :H], key_mask[..., :end]
            if i == last and L > 1:  # a prefill reads the last position only: the rest gave keys/values
                x, q, mask = x[:, -1:], q[:, -1:], mask[..., -1:, :]
            att = F.scaled_dot_product_attention(
                _round(q, cd).transpose(1, 2),
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=mask,
                enable_gqa=H != K,
            )
            x = x + w.o(att.transpose(1, 2).reshape(B, -1, H * d).to(cd))
            gate, up = w.gate_up(self._norm(x, w.norm2).to(cd)).chunk(2, dim=-1)
            x = x + w.down(F.silu(gate) * up)
        return self._norm(x[:, -1], final_norm)

    def _native_step(self, weights, ids, rotary, cache, start, key_mask):
        """``_forward`` of one token per row with each layer in one ``smallm.decode_layer`` call."""
        embed, layers, final_norm, _ = weights
        B = ids.shape[0]
        x = F.embedding(ids[:, 0], embed)  # [B, hidden], a fresh contiguous tensor
        cos, sin = (t.reshape(B, -1).contiguous() for t in rotary)
        mask = key_mask.reshape(B, -1)  # [B, S]
        inter = layers[0].native.wg.shape[0]
        scratch = torch.empty(
            smallm.scratch_size(B, x.shape[1], self.heads, self.kv_heads, self.head_dim, inter, mask.shape[1])
        )
        for w, (keys, values) in zip(layers, cache):
            smallm.decode_layer(x, w.native, cos, sin, keys, values, mask, start, self.eps, scratch)
        return self._norm(x, final_norm)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        n: int,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``n`` continuations of each left-padded prompt row.

        Returns ``(tokens [U*n, T], logprobs [U*n, T])`` task-major, ``T <= max_new_tokens``;
        after a row's end-of-sequence token come ``pad_token_id`` and log-prob 0. Log-probs are
        ``log_softmax(logits / temperature)`` of the chosen token (raw logits when greedy),
        before top-p truncation; sampling draws from torch's global RNG. Under ``torch.autocast``
        (``trainer.mixed_precision``) the projections run in its dtype, as in the trainer's passes.
        """
        device = self.model.model.embed_tokens.weight.device
        compute_dtype = (
            torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        )
        U, P = prompts.shape
        with torch.autocast(device.type, enabled=False):  # the casts are explicit (see _forward)
            weights = self._weights(compute_dtype, U * n)
            dtype = weights[0].dtype
            prompts, prompt_mask = prompts.to(device), prompt_mask.to(device).bool()
            B, S = U * n, P + max_new_tokens
            K, d = self.kv_heads, self.head_dim
            positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
            cos_t, sin_t = self._rotary_tables(S, dtype, device)
            # prefill each distinct prompt once: causal, real keys only (each slot also sees itself,
            # so padding rows stay finite)
            causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
            mask = (causal & prompt_mask[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)
            small = [
                (
                    torch.empty(U, K, P, d, dtype=dtype, device=device),
                    torch.empty(U, K, P, d, dtype=dtype, device=device),
                )
                for _ in weights[1]
            ]
            rotary = (cos_t[positions][:, :, None], sin_t[positions][:, :, None])
            hidden = self._forward(weights, prompts, rotary, small, 0, mask[:, None])
            cache = []
            for keys, values in small:
                big_k = torch.empty(B, K, S, d, dtype=dtype, device=device)
                big_v = torch.empty(B, K, S, d, dtype=dtype, device=device)
                big_k[:, :, :P] = keys.repeat_interleave(n, dim=0)
                big_v[:, :, :P] = values.repeat_interleave(n, dim=0)
                cache.append((big_k, big_v))
            hidden = hidden.repeat_interleave(n, dim=0)  # (B, H)
            key_mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=device)
            key_mask[:, 0, 0, :P] = prompt_mask.repeat_interleave(n, dim=0)
            pos = positions[:, -1].repeat_interleave(n, dim=0) + 1  # (B,) next position
            tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
            logps = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
            done = torch.zeros(B, dtype=torch.bool, device=device)
            lm_head = weights[3]
            T = 0
            for t in range(max_new_tokens):
                logits = lm_head(hidden).float()  # (B, V)
                if temperature > 0:
                    logits = logits / temperature
                logp = torch.log_softmax(logits, dim=-1)
                if temperature > 0:
                    nxt = _draw(_top_p(logits, top_p).softmax(-1))
                else:
                    nxt = logits.argmax(-1)
                nxt = torch.where(done, pad_token_id, nxt)
                tokens[:, t] = nxt
                logps[:, t] = torch.where(done, 0.0, logp.gather(1, nxt[:, None]).squeeze(1))
                done |= nxt == eos_token_id
                T = t + 1
                if t + 1 == max_new_tokens or bool(done.all()):
                    break
                key_mask[:, 0, 0, P + t] = True
                rotary = (cos_t[pos][:, None, None], sin_t[pos][:, None, None])
                hidden = self._forward(weights, nxt[:, None], rotary, cache, P + t, key_mask)
                pos = pos + 1
            return tokens[:, :T], logps[:, :T]


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype``'s precision, kept in its own dtype."""
    return t if t.dtype == dtype else t.to(dtype).to(t.dtype)


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs [B, V]`` by inverting the CDF at a uniform draw (the
    distribution of ``torch.multinomial``, several times cheaper on a CPU for one sample)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    ordered, order = logits.sort(dim=-1)  # ascending
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False  # always keep the most likely token
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
