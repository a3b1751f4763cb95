"""Position encodings: how a permutation-invariant attention learns where a token is.

    learned      a (block_size, C) table added to the token embeddings (GPT-2's wpe; model.py)
    sinusoidal   sinusoidal_table: a fixed (T, C) table added to the token embeddings
    rope         rope_tables + apply_rope: q and k rotated by their position in every layer
    alibi        alibi_bias: a per-head linear penalty on distance added to the attention scores

Plain tensor functions (no modules, no parameters, no buffers), so a parallel copy of the
attention computes the same tables from the same positions.
"""

from __future__ import annotations

import math

import torch


def sinusoidal_table(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(T,) positions -> (T, dim) fp32: channel 2i = sin(pos / base^(2i/dim)), 2i+1 = cos(same).

    Wavelengths grow geometrically from 2*pi to base*2*pi, and PE(pos + k) is a rotation of
    PE(pos) in every (sin, cos) pair, so an offset is a linear function of the table.
    """
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    angles = positions.float()[:, None] * inv[None, :]  # (T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # sin, cos interleaved


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """(head_dim/2,) angular speeds theta^(-2i/head_dim): pair i turns by pos * inv_freq[i]."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_tables(start: int, length: int, head_dim: int, theta: float, device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (length, head_dim), for positions start..start+length-1.

    Hugging Face's layout (rotate_half): channel i and channel i + head_dim/2 form pair i, so
    both halves of the table repeat the same head_dim/2 angles. Computed in fp32 and cast to
    `dtype`, as LlamaRotaryEmbedding does (its angles match these bit for bit).
    """
    pos = torch.arange(start, start + length, device=device, dtype=torch.float)
    freqs = pos[:, None] * rope_inv_freq(head_dim, theta, device)[None, :]  # (T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_tables_at(positions: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_tables for any positions (T,) (zigzag's, a paged batch's: not contiguous): cos, sin (T, D)."""
    freqs = positions.float()[:, None] * rope_inv_freq(head_dim, theta, positions.device)[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(.., D) -> (.., D): [x1, x2] -> [-x2, x1], i.e. each pair (x1[i], x2[i]) turned by 90 degrees."""
    x1, x2 = x[..., : x.size(-1) // 2], x[..., x.size(-1) // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every pair of x (.., T, D) by its position's angle: x cos + rotate_half(x) sin.

    Meta's original checkpoints pair adjacent channels (2i, 2i+1) instead; Hugging Face's
    conversion permutes the rows of q_proj and k_proj once so that this half-split form computes
    the same attention. Weights loaded from HF (model.GPT.from_hf) are already permuted.
    """
    return x * cos + rotate_half(x) * sin


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence starting at 2^(-8/n) with
    the same ratio, for n a power of two (8 heads: 1/2, 1/4, ..., 1/256); otherwise the slopes of
    the nearest lower power of two, then every other slope of the next one."""

    def power_of_2(n: int) -> list[float]:
        first = 2 ** (-8 / n)
        return [first ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(power_of_2(n_head))
    below = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_2(below) + power_of_2(2 * below)[0::2][: n_head - below])


def alibi_bias(slopes: torch.Tensor, start: int, length: int, keys: int) -> torch.Tensor:
    """(H,) slopes -> (H, length, keys) additive score bias -slope * (i - j) for the queries at
    positions start..start+length-1 and keys 0..keys-1 (the causal mask is applied separately)."""
    i = torch.arange(start, start + length, device=slopes.device)[:, None]
    j = torch.arange(keys, device=slopes.device)[None, :]
    return -slopes[:, None, None] * (i - j).float()[None]


def rope_shift_invariance(head_dim: int = 8, theta: float = 10000.0, m: int = 3, n: int = 7,
                          shift: int = 100, seed: int = 0) -> dict:
    """Rotate one q at position m and one k at position n, then both again `shift` positions
    later: q.k changes with m - n only. Returns the vectors and the dot products (lab 01)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)

    def at(x: torch.Tensor, pos: int) -> torch.Tensor:
        cos, sin = rope_tables(pos, 1, head_dim, theta, "cpu")
        return apply_rope(x[None], cos, sin)[0]

    q_m, k_n = at(q, m), at(k, n)
    q_s, k_s = at(q, m + shift), at(k, n + shift)
    return {"q": q, "k": k, "q_at_m": q_m, "q_at_m_shifted": q_s,
            "m": m, "n": n, "shift": shift, "dot_unrotated": float(q @ k),
            "dot": float(q_m @ k_n), "dot_shifted": float(q_s @ k_s),
            "norm_kept": float((q_m.norm() - q.norm()).abs())}


def rope_demo_text(demo: dict) -> str:
    """rope_shift_invariance's result in four lines: q unrotated, at m and at m + shift, then the
    three dot products (the rotated ones equal: the score depends on m - n only)."""
    m, n, s = demo["m"], demo["n"], demo["shift"]
    vectors = {"q": demo["q"], f"q at position {m}": demo["q_at_m"],
               f"q at position {m + s}": demo["q_at_m_shifted"]}
    lines = [f"  {name:<21} {[round(v, 3) for v in x.tolist()]}" for name, x in vectors.items()]
    dots = (f"  q.k unrotated {demo['dot_unrotated']:.4f}; q at {m}, k at {n}: {demo['dot']:.4f}; "
            f"q at {m + s}, k at {n + s}: {demo['dot_shifted']:.4f} (same offset, same score)")
    return "\n".join([*lines, dots])
