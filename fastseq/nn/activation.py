"""fastseq.nn.MultiheadAttention: drop-in for torch.nn.MultiheadAttention (constructor, parameter names,
initialisation, state_dict), with forward on fastseq.functional.scaled_dot_product_attention."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.functional import linear, pad

from .. import functional as F


def keep_torch_fast_path_off(module: torch.nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing. torch.nn.TransformerEncoderLayer.forward, in eval mode without grad,
    calls torch._transformer_encoder_layer_fwd with self_attn's weights instead of calling self_attn, unless
    (among other conditions) one of its submodules has a forward hook or pre-hook: this hook on the attention
    module keeps the layer on the path that calls it, so fastseq's forward is the one that runs."""
    return None


def disable_torch_fast_path(module: torch.nn.Module) -> None:
    """Registers keep_torch_fast_path_off on `module` as a forward pre-hook, once (calling it again does nothing)."""
    if keep_torch_fast_path_off not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(keep_torch_fast_path_off)


def _additive_mask(mask: Tensor | None, name: str, dtype: torch.dtype, other: Tensor | None = None,
                   other_name: str = "") -> Tensor | None:
    """A bool mask (True = NOT allowed) as an additive mask of `dtype` (-inf where True, 0 elsewhere); a float mask
    as given. Warns, as torch, when `other` (the mask it will be merged with) has another dtype."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported")
    if other is not None and other.dtype != mask.dtype:
        warnings.warn(f"Support for mismatched {name} and {other_name} is deprecated. Use same type for both "
                      f"instead.", stacklevel=3)
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask


def _check_dims(query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                attn_mask: Tensor | None, num_heads: int) -> bool:
    """torch's checks of the number of dims; returns whether the input is batched (3-D query)."""
    if query.dim() not in (2, 3):
        raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D "
                             f"query tensor")
    batched = query.dim() == 3
    kind = "batched (3-D)" if batched else "unbatched (2-D)"
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise AssertionError(f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found "
                             f"{key.dim()}-D and {value.dim()}-D tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise AssertionError(f"For {kind} `query`, expected `key_padding_mask` to be `None` or "
                             f"{query.dim() - 1}-D but found {key_padding_mask.dim()}-D tensor instead")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise AssertionError(f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                                 f"{attn_mask.dim()}-D tensor instead")
        expected = (num_heads, query.shape[0], key.shape[0])
        if not batched and attn_mask.dim() == 3 and attn_mask.shape != expected:
            raise AssertionError(f"Expected `attn_mask` shape to be {expected} but got {attn_mask.shape}")
    return batched


def _heads(t: Tensor, batch_first: bool) -> Tensor:
    """(len, N, H, hd) or, batch_first, (N, len, H, hd) -> a (N, H, len, hd) view."""
    return t.transpose(1, 2) if batch_first else t.permute(1, 2, 0, 3)


def _append(t: Tensor, row: Tensor) -> Tensor:
    """t (N, H, S, hd) with `row` (broadcast to (N, H, 1, hd)) appended along the keys."""
    return torch.cat([t, row.expand(t.shape[0], t.shape[1], 1, t.shape[3])], dim=2)


def _attention_weights(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(hd) + mask) (N, H, L, S), computed in float32 (float64 for float64 inputs) and
    returned in q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask.to(acc)
    return torch.softmax(scores, dim=-1).to(q.dtype)


def _attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float
                            ) -> tuple[Tensor, Tensor]:
    """torch's own computation when the weights are wanted under dropout: p = dropout(softmax(q k^T / sqrt(hd) +
    mask)), out = p v; returns (out (N, H, L, hd), p), so that the weights returned are the ones applied."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if mask is not None:
        scores = scores + mask
    p = torch.nn.functional.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
    return torch.matmul(p, v), p


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention (same arguments, parameters, initialisation and state_dict) on fastseq's
    attention kernels: out = concat_h(softmax(q_h k_h^T / sqrt(hd) + mask) v_h) W_o^T + b_o with
    q = query W_q^T + b_q, k = key W_k^T + b_k, v = value W_v^T + b_v, hd = embed_dim / num_heads.

    Self-attention (query is key is value) projects q, k and v with one GEMM on in_proj_weight, cross-attention
    with key is value projects k and v with one; the heads are strided views of the projections, not copies.
    key_padding_mask goes to the attention as (N, 1, 1, S) and a 2-D attn_mask as (L, S), neither expanded; when
    both are given they are merged into one (N, 1 or num_heads, L, S) additive mask. Bool masks mean True = NOT
    allowed (torch.nn.MultiheadAttention's convention, the opposite of scaled_dot_product_attention's).
    need_weights=True also returns softmax(q k^T / sqrt(hd) + mask) (averaged over heads, or per head), computed
    in float32 beside the fused attention; with dropout active in training, the whole attention then runs on torch
    ops so that the weights returned are the ones applied. Nested tensors are not supported.

    A forward pre-hook (keep_torch_fast_path_off) keeps torch.nn.TransformerEncoderLayer's eval-mode fast path,
    which would bypass this forward, off."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        disable_torch_fast_path(self)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """(attn_output, attn_weights or None), with torch.nn.MultiheadAttention.forward's arguments, shapes and
        semantics: query (L, N, E) ((N, L, E) with batch_first, (L, E) unbatched), key (S, N, kdim), value
        (S, N, vdim); key_padding_mask (N, S) or (S,); attn_mask (L, S) or (N * num_heads, L, S); is_causal a
        hint that attn_mask is the causal mask (it needs attn_mask)."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise NotImplementedError("fastseq.nn.MultiheadAttention does not take nested tensors (which "
                                      "torch.nn.TransformerEncoder makes in eval mode from src_key_padding_mask): "
                                      "construct the TransformerEncoder with enable_nested_tensor=False")
        self_attention, shared_kv = query is key and key is value, key is value
        key_padding_mask = _additive_mask(key_padding_mask, "key_padding_mask", query.dtype, attn_mask,
                                          "attn_mask")
        attn_mask = _additive_mask(attn_mask, "attn_mask", query.dtype)
        batched = _check_dims(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        batch_first = self.batch_first
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
            batch_first = True
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:  # the hint replaces the mask
            attn_mask = None

        n, tgt_len, src_len = self._check_shapes(query, key, value, key_padding_mask, attn_mask, batch_first)
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads
        q, k, v = (_heads(t.unflatten(-1, (heads, head_dim)), batch_first)
                   for t in self._in_projection(query, key, value, self_attention, shared_kv))
        k, v, extra = self._extra_keys(k, v)
        if extra:
            attn_mask = None if attn_mask is None else pad(attn_mask, (0, extra))
            key_padding_mask = None if key_padding_mask is None else pad(key_padding_mask, (0, extra))
        mask = None  # (L, S), (N, H, L, S), (N, 1, 1, S) or, merged, (N, 1 or H, L, S)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(n, heads, tgt_len, src_len + extra)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(n, 1, 1, src_len + extra)
            mask = padding if mask is None else mask + padding

        dropout_p = self.dropout if self.training else 0.0
        if need_weights and dropout_p > 0.0:
            out, weights = _attention_with_dropout(q, k, v, mask, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal)
            weights = _attention_weights(q, k, mask) if need_weights else None
            if weights is not None:
                # torch computes out = weights v here, so a row with no finite score (weights NaN) gives NaN, not 0
                out = out.masked_fill(weights.detach().isnan().all(-1, keepdim=True), float("nan"))

        out = out.transpose(1, 2) if batch_first else out.permute(2, 0, 1, 3)  # (N, L, H, hd) or (L, N, H, hd)
        out = linear(out.flatten(2), self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _check_shapes(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                      attn_mask: Tensor | None, batch_first: bool) -> tuple[int, int, int]:
        """torch's checks of the embedding dims, key and value and the masks' shapes; returns (N, L, S)."""
        n, tgt_len = (query.shape[0], query.shape[1]) if batch_first else (query.shape[1], query.shape[0])
        src_len = key.shape[1] if batch_first else key.shape[0]
        embed_dim, heads = query.shape[-1], self.num_heads
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if embed_dim % heads:
            raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {heads}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        if attn_mask is not None:
            shape = (tgt_len, src_len) if attn_mask.dim() == 2 else (n * heads, tgt_len, src_len)
            if attn_mask.shape != shape:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but "
                                   f"should be {shape}.")
        if key_padding_mask is not None and key_padding_mask.shape != (n, src_len):
            i, want = (0, n) if key_padding_mask.shape[0] != n else (1, src_len)
            raise AssertionError(f"Expected key_padded_mask.shape[{i}] to be {want}, but got "
                                 f"{key_padding_mask.shape[i]}")
        return n, tgt_len, src_len

    def _extra_keys(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """k, v (N, H, S, hd) with bias_k, bias_v (add_bias_kv) and then a zero key and value (add_zero_attn)
        appended, and how many keys were appended."""
        if (self.bias_k is None) != (self.bias_v is None):
            raise AssertionError("bias_k is set but bias_v is None" if self.bias_v is None else
                                 "bias_v is set but bias_k is None")
        extra = 0
        if self.bias_k is not None:
            head_shape = (1, k.shape[1], 1, k.shape[3])
            k, v = _append(k, self.bias_k.view(head_shape)), _append(v, self.bias_v.view(head_shape))
            extra += 1
        if self.add_zero_attn:
            k, v = _append(k, k.new_zeros(())), _append(v, v.new_zeros(()))
            extra += 1
        return k, v, extra

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, shared_kv: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v = query W_q^T + b_q, key W_k^T + b_k, value W_v^T + b_v (each (..., embed_dim), the input's
        leading dims): one GEMM for self-attention, one for k and v when key is value, views of its result."""
        e = self.embed_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.split(e)
        if not self._qkv_same_embed_dim:
            for name, x, w in (("query", query, self.q_proj_weight), ("key", key, self.k_proj_weight),
                               ("value", value, self.v_proj_weight)):
                if w.shape != (e, x.shape[-1]):
                    raise AssertionError(f"expecting {name} weights shape of {(e, x.shape[-1])}, but got "
                                         f"{w.shape}")
            return (linear(query, self.q_proj_weight, b_q),
                    linear(key, self.k_proj_weight, b_k),
                    linear(value, self.v_proj_weight, b_v))
        w = self.in_proj_weight
        if self_attention:
            return linear(query, w, b).unflatten(-1, (3, e)).unbind(-2)
        w_q, w_k, w_v = w.split(e)
        q = linear(query, w_q, b_q)
        if shared_kv:
            k, v = linear(key, w[e:], None if b is None else b[e:]).unflatten(-1, (2, e)).unbind(-2)
            return q, k, v
        return q, linear(key, w_k, b_k), linear(value, w_v, b_v)
