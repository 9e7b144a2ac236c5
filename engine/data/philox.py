"""Counter-based random numbers for the data pipeline: Philox4x32-10 (Salmon et al., SC'11), vectorised in numpy.

Why counter-based: a draw is a pure function of (key, counter), so the random decisions of one sample are
computed from the sample's own coordinates (seed, epoch, position in the epoch) wherever and whenever it is
built: the same masks whatever the batch size, the number of DataLoader workers, the loader, or the step a
run resumed at. numpy's Generator cannot be keyed per element without building one object per sample; this
evaluates every (key, counter) of a batch in one vectorised pass (10 rounds of uint64 arithmetic on arrays).

Layout used by the engine: key = the 64-bit seed (two 32-bit words, low first); counter = (block, position,
epoch, stream): `block` numbers the 4-word blocks one sample draws for one stream (tokens, regions, ...),
`stream` separates the kinds of draws so that adding draws to one never shifts another. The output matches
Random123's known-answer vectors (tests/test_data_sampling.py), and depends on nothing but this file: no
numpy version can change a data order or a mask.
"""

from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl) increments
_LO32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
ROUNDS = 10
_BLOCK_ELEMENTS = 1 << 20  # blocks evaluated at a time: bounds the temporaries of a large call


def philox4x32(
    c0: np.ndarray | int, c1: np.ndarray | int, c2: np.ndarray | int, c3: np.ndarray | int, key: int
) -> np.ndarray:
    """Philox4x32-10 of the counters (c0, c1, c2, c3), broadcast together, under a 64-bit key.

    Returns uint32 [4, *shape]: the four output words of each block. Counter words are taken modulo 2^32.
    """
    shape = np.broadcast_shapes(*(np.shape(c) for c in (c0, c1, c2, c3)))
    words = [
        np.broadcast_to(np.asarray(c, dtype=np.int64).astype(np.uint64) & _LO32, shape).reshape(-1)
        for c in (c0, c1, c2, c3)
    ]
    n = words[0].shape[0]
    out = np.empty((4, n), dtype=np.uint32)
    for start in range(0, n, _BLOCK_ELEMENTS):
        stop = min(start + _BLOCK_ELEMENTS, n)
        out[:, start:stop] = _rounds(*(w[start:stop] for w in words), key=key)
    return out.reshape(4, *shape)


def _rounds(x0: np.ndarray, x1: np.ndarray, x2: np.ndarray, x3: np.ndarray, key: int) -> np.ndarray:
    k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0, p1 = _M0 * x0, _M1 * x2  # 32 x 32 -> 64-bit products, split into 32-bit halves
        hi0, lo0, hi1, lo1 = p0 >> _SHIFT32, p0 & _LO32, p1 >> _SHIFT32, p1 & _LO32
        x0, x1, x2, x3 = hi1 ^ x1 ^ np.uint64(k0), lo1, hi0 ^ x3 ^ np.uint64(k1), lo0
    return np.stack([x0, x1, x2, x3]).astype(np.uint32)


def to_unit(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Two uint32 words -> float64 uniform on [0, 1) with 53 random bits (genrand_res53's construction)."""
    a, b = (hi >> np.uint32(5)).astype(np.float64), (lo >> np.uint32(6)).astype(np.float64)
    return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0)


def uniforms(key: int, positions: np.ndarray, epoch: int, stream: int, count: int) -> np.ndarray:
    """float64 [len(positions), count] uniforms on [0, 1): column j of a row is a function of
    (key, position, epoch, stream, j) only (block j // 2, word pair j % 2), so a prefix of the columns
    does not depend on `count`."""
    positions = np.asarray(positions, dtype=np.int64)
    blocks = np.arange((count + 1) // 2, dtype=np.int64)
    w = philox4x32(blocks[None, :], positions[:, None], epoch, stream, key)  # [4, P, blocks]
    pairs = np.stack([to_unit(w[0], w[1]), to_unit(w[2], w[3])], axis=-1)  # [P, blocks, 2]
    return pairs.reshape(len(positions), -1)[:, :count]


def random_below(u: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """int64 floor(u * n): a uniform integer in [0, n) from a uniform u (bias at most n / 2^53)."""
    return np.minimum((u * n).astype(np.int64), np.asarray(n, dtype=np.int64) - 1)
