"""Pure-PyTorch stand-ins for `flash_attn.flash_attn_func` / `flash_attn_varlen_func` with their exact semantics (as the
original's `modeling/bagel/qwen2_navit.py` and `siglip_navit.py` call them): packed `(total, heads, head_dim)` varlen
inputs delimited by `cu_seqlens`, grouped-query attention (key/value heads shared by `heads // kv_heads` query heads),
default scale `1 / sqrt(head_dim)`, and causal masking aligned to the bottom right (query i of a sequence with `Lq`
queries and `Lk` keys sees keys `j <= i + Lk - Lq`; a query that sees no key returns zeros). Substituted for the kernel
in tests, so that the wiring through transformers' flash-attention integration runs on CPU."""

import torch


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
    block_table=None,
):  # fmt: skip
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or block_table is not None:
        raise NotImplementedError("the reference kernel implements plain (optionally causal) attention only")
    heads, head_dim = q.shape[1], q.shape[2]
    groups = heads // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    out = q.new_zeros(q.shape[0], heads, v.shape[-1])
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if qe == qs or ke == ks:
            continue
        query = q[qs:qe].transpose(0, 1).float()
        key = k[ks:ke].transpose(0, 1).float().repeat_interleave(groups, dim=0)
        value = v[ks:ke].transpose(0, 1).float().repeat_interleave(groups, dim=0)
        scores = query @ key.transpose(1, 2) * scale
        if causal:
            lq, lk = qe - qs, ke - ks
            visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees no key: zeros
        out[qs:qe] = (probs @ value).transpose(0, 1).to(out.dtype)
    return out


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_attn_probs=False,
):  # fmt: skip
    batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(batch + 1) * lq
    cu_k = torch.arange(batch + 1) * lk
    out = flash_attn_varlen_func(
        q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]), cu_q, cu_k, lq, lk,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes,
    )  # fmt: skip
    return out.reshape(batch, lq, *out.shape[1:])
