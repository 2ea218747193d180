"""Near duplicates: the same picture re-encoded or resized, found without comparing all pairs.

Each decoded image gets two small fingerprints in the integrity stage's decode pass: the
perceptual hash of imagehash's ``phash`` (``perceptual_hash``: a 64-bit DCT hash of the grey
image, 16 hex digits) and a 4x4 colour thumbnail (``colour_layout``, 48 bytes). The hash is
imagehash's algorithm with the same bits (a test compares them), computed with the 8
low-frequency rows of the DCT matrix; only where coefficients tie with the median up to
rounding (symmetric pictures, such as a solid colour with one pixel changed) can a bit differ
from scipy's DCT. Per image only Pillow's two reductions run (the 32 x 32 grey image the hash
is taken from, and the thumbnail); the hashes of a whole chunk of files are then computed in
one batch, so numpy's per-call overhead is paid once per chunk, not per image (a call of
``imagehash.phash`` per image costs about three times the decode of a small image).

Two images are near duplicates when their hashes differ in at most
``integrity.near_duplicate_distance`` bits and their thumbnails by at most
``integrity.near_duplicate_colour`` (mean absolute difference, 0-255). The hash ignores
colour, so two different pictures with the same coarse structure (two gradients at one
angle, two textures of one period) can share a hash but not their colours; re-encoding and
resizing change neither much.

Candidate pairs come from multi-index hashing: the 64 bits are cut into ``m`` chunks
(``m = min(distance + 1, 7)``) and two images are compared only if one chunk is identical.
By pigeonhole every pair at most ``m - 1`` bits apart is found; a pair further apart (up to the
threshold) is found when one of its chunks happens to be clean: with 7 chunks, for differing
bits at random positions, in about 97% of pairs 8 bits apart, 85% at 10 and 69% at 12. The
work is the number of candidate pairs, about ``m * n**2 / 2**(64 / m)`` for well-spread
hashes, not ``n**2``; images whose hashes share a chunk value (very many near-identical
pictures) cost more. A pair is compared in the first chunk it agrees on only, so many
identical hashes cost one thumbnail comparison per pair, not one per chunk.

Images too flat to have a meaningful hash (a grey standard deviation below 0.5: a blank or a
solid colour) get none and are never near duplicates of anything.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image

HASH_BITS = 64
THUMB_SIDE = 4
THUMB_BYTES = THUMB_SIDE * THUMB_SIDE * 3
_MAX_CHUNKS = 7
_FLAT_STD = 0.5
_HASH_SIDE = 32  # imagehash.phash resizes to hash_size * highfreq_factor = 8 * 4
_LOW = 8  # imagehash.phash keeps the 8 x 8 lowest frequencies
# scipy.fftpack.dct (type II, unnormalised) along one axis is this matrix times the axis
_DCT = 2 * np.cos(
    np.pi * np.arange(_LOW)[:, None] * (2 * np.arange(_HASH_SIDE)[None, :] + 1) / (2 * _HASH_SIDE)
)


def reduced(img: Image.Image) -> tuple[bytes, bytes] | None:
    """(32 x 32 grey image as imagehash.phash resizes it, 4 x 4 RGB thumbnail), as bytes, of a
    decoded image; None when Pillow cannot convert its mode."""
    try:
        grey = img.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.LANCZOS)
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return grey.tobytes(), rgb.resize((THUMB_SIDE, THUMB_SIDE), Image.BOX).tobytes()
    except Exception:  # an exotic mode Pillow cannot convert: no fingerprint, no finding
        return None


def phash_bits(greys: np.ndarray) -> np.ndarray:
    """imagehash.phash of n 32 x 32 grey images (n x 32 x 32, float64): n x 64 booleans."""
    # einsum's own loops, not BLAS: OpenBLAS threads in each decode worker, on cores the other
    # workers keep busy, made one batched matmul up to 30 times slower than this
    rows = np.einsum("nab,jb->naj", greys, _DCT)
    low = np.einsum("ia,naj->nij", _DCT, rows).reshape(len(greys), _LOW * _LOW)
    middle = np.sort(low, axis=1)[:, 31:33].mean(axis=1)  # numpy's median of 64 values
    return low > middle[:, None]


def fingerprints(
    smalls: Sequence[tuple[bytes, bytes] | None],
) -> list[tuple[str | None, bytes | None]]:
    """(perceptual hash as hex, thumbnail bytes) of each output of :func:`reduced`;
    (None, None) for a missing or flat one."""
    prints: list[tuple[str | None, bytes | None]] = [(None, None)] * len(smalls)
    present = [(i, small) for i, small in enumerate(smalls) if small is not None]
    if not present:
        return prints
    pixels = np.frombuffer(b"".join(grey for _, (grey, _) in present), dtype=np.uint8)
    pixels = pixels.reshape(len(present), _HASH_SIDE * _HASH_SIDE).astype(np.int64)
    # std >= _FLAT_STD in exact integers: n * sum(x^2) - sum(x)^2 >= (n * _FLAT_STD)^2
    n = pixels.shape[1]
    spread = n * np.einsum("ij,ij->i", pixels, pixels) - pixels.sum(axis=1) ** 2
    textured = spread >= (n * _FLAT_STD) ** 2
    greys = pixels[textured].reshape(-1, _HASH_SIDE, _HASH_SIDE).astype(np.float64)
    packed = iter(np.packbits(phash_bits(greys), axis=1))
    for (i, (_, thumb)), keep in zip(present, textured, strict=True):
        if keep:
            prints[i] = next(packed).tobytes().hex(), thumb
    return prints


def _chunks(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of each of the m chunks that split the 64 bits as evenly as possible."""
    m = max(1, min(max_distance + 1, _MAX_CHUNKS))
    bounds = np.linspace(0, HASH_BITS, m + 1).round().astype(int)
    return [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in itertools.pairwise(bounds)]


def _same_key_pairs(
    keys: np.ndarray, level: np.ndarray, max_gap: float
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All index pairs (i, j), i != j, with ``keys[i] == keys[j]`` and ``level`` at most
    ``max_gap`` apart, in batches.

    After sorting by key, then level, the members of one key are contiguous: batch ``k`` pairs
    each member with the member ``k`` places after it, and a member stays active while it has
    one within the gap (the levels only grow along the key's run).
    """
    order = np.lexsort((level, keys))
    sorted_keys = keys[order]
    sorted_level = level[order]
    start = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[start, len(keys)])
    bucket = np.repeat(np.arange(len(start)), sizes)
    after = sizes[bucket] - (np.arange(len(keys)) - start[bucket]) - 1  # members after it
    active = np.flatnonzero(after > 0)
    offset = 1
    while len(active):
        active = active[sorted_level[active + offset] - sorted_level[active] <= max_gap]
        yield order[active], order[active + offset]
        offset += 1
        active = active[after[active] >= offset]


def near_duplicate_pairs(
    hashes: np.ndarray, thumbs: np.ndarray, max_distance: int, max_colour: float
) -> np.ndarray:
    """Index pairs (p x 2, i < j) of near duplicates among ``hashes`` (uint64, n) with their
    ``thumbs`` (uint8, n x 48)."""
    found = []
    thumbs = thumbs.astype(np.int16)
    # the mean of the 48 thumbnail values differs by at most their mean absolute difference:
    # pairs further apart in it cannot match and are never formed
    level = thumbs.mean(axis=1)
    chunks = _chunks(max_distance)
    for k, (shift, mask) in enumerate(chunks):
        keys = (hashes >> np.uint64(shift)) & np.uint64(mask)
        earlier = [np.uint64(m << s) for s, m in chunks[:k]]
        for a, b in _same_key_pairs(keys, level, max_colour + 1e-9):
            differ = hashes[a] ^ hashes[b]
            close = np.bitwise_count(differ) <= max_distance
            for bits in earlier:  # a pair equal in an earlier chunk was compared there
                close &= (differ & bits) != 0
            a, b = a[close], b[close]
            same_colour = np.abs(thumbs[a] - thumbs[b]).mean(axis=1) <= max_colour
            found.append(np.stack([a[same_colour], b[same_colour]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found), axis=1)
    return np.unique(pairs, axis=0)


def group_labels(pairs: np.ndarray, n: int) -> np.ndarray:
    """Connected components of the pair graph: a group number per item, -1 when alone.

    Groups are numbered in the order of their first member.
    """
    from scipy.sparse import coo_matrix  # not at import: the code location loads without scipy
    from scipy.sparse.csgraph import connected_components

    labels = np.full(n, -1, dtype=np.int64)
    if len(pairs) == 0:
        return labels
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    in_pair = np.zeros(n, dtype=bool)
    in_pair[pairs.ravel()] = True
    _, first = np.unique(component[in_pair], return_index=True)
    firsts = np.sort(np.flatnonzero(in_pair)[first])
    number = {int(component[i]): g for g, i in enumerate(firsts)}
    labels[in_pair] = [number[int(c)] for c in component[in_pair]]
    return labels


def hashes_and_thumbs(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The ``perceptual_hash`` (hex) and ``colour_layout`` columns as uint64 and uint8 arrays."""
    hashes = np.array([int(h, 16) for h in df["perceptual_hash"]], dtype=np.uint64)
    thumbs = np.frombuffer(b"".join(df["colour_layout"]), dtype=np.uint8)
    return hashes, thumbs.reshape(len(df), THUMB_BYTES)
