"""Near duplicates: the same picture re-encoded or resized, found without comparing all pairs.

Each decoded image gets two small fingerprints in the integrity stage's decode pass: the
perceptual hash of imagehash's ``phash`` (``perceptual_hash``: a 64-bit DCT hash of the grey
image, 16 hex digits) and a 4x4 colour thumbnail (``colour_layout``, 48 bytes). The hash is
imagehash's algorithm with the same bits (a test compares them), computed with the 8
low-frequency rows of the DCT matrix; only where coefficients tie with the median up to
rounding (symmetric pictures, such as a solid colour with one pixel changed) can a bit differ
from scipy's DCT. Everything runs in batches of a whole chunk of files, so that Pillow's and
numpy's per-call overhead is paid once per chunk, not per image (a call of ``imagehash.phash``
per image costs about three times the decode of a small image). A small L or RGB image is
kept as decoded, and all those of one size are converted and resized together, in strips, by
the same Pillow calls, bit for bit as one at a time; a large or exotic one is reduced on its
own (the 32 x 32 grey image the hash is taken from, and the thumbnail), where its decode costs
far more than that.

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

import functools
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
# images up to this many pixels are reduced with their chunk: a chunk of 1,024 then holds at
# most 16 MiB of them, and larger images spend far more in their decode than in Pillow's calls
_BATCH_PIXELS = 64 * 64
_BATCH_MODES = ("L", "RGB")
_MIN_BATCH = 4  # fewer images of a size go one at a time: a new size costs a probe of Pillow

# per image: (32 x 32 grey image, 4 x 4 RGB thumbnail) as bytes; a small image itself, to be
# reduced with the others of its mode and size; or None
Small = tuple[bytes, bytes] | Image.Image | None


def reduced(img: Image.Image) -> Small:
    """What :func:`fingerprints` needs of a decoded image: the image itself when it is small and
    L or RGB, else its reductions; None when Pillow cannot convert its mode."""
    if img.mode in _BATCH_MODES and img.width * img.height <= _BATCH_PIXELS:
        try:
            img.load()  # now or never: the batch comes after its file is closed
        except Exception:  # a frame it cannot read again (it seeked to count them)
            return None
        return img
    return _reduce_one(img)


def _reduce_one(img: Image.Image) -> tuple[bytes, bytes] | None:
    """(32 x 32 grey image as imagehash.phash resizes it, 4 x 4 RGB thumbnail) of one image."""
    try:
        grey = img.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.LANCZOS)
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return grey.tobytes(), rgb.resize((THUMB_SIDE, THUMB_SIDE), Image.BOX).tobytes()
    except Exception:  # an exotic mode Pillow cannot convert: no fingerprint, no finding
        return None


def _resize_pass(stack: np.ndarray, side: int, axis: str, method: Image.Resampling) -> np.ndarray:
    """Pillow's resampling pass along ``axis`` ("x" or "y") of n images (n x h x w [x 3]) in one
    call: the images stacked one above the other for the horizontal pass, side by side for the
    vertical one, so that no output pixel reaches across two images."""
    (n, h, w), rest = stack.shape[:3], stack.shape[3:]
    if axis == "x":
        tall = Image.fromarray(stack.reshape(n * h, w, *rest))
        return np.asarray(tall.resize((side, n * h), method)).reshape(n, h, side, *rest)
    wide = Image.fromarray(stack.swapaxes(0, 1).reshape(h, n * w, *rest))
    out = np.asarray(wide.resize((n * w, side), method))
    return out.reshape(side, n, w, *rest).swapaxes(0, 1)


@functools.cache
def _pass_order(mode: str, size: tuple[int, int], side: int, method: Image.Resampling) -> str:
    """The order of the one-axis passes ("xy" or "yx") that reproduces Pillow's own resize of
    an image of this mode and size to ``side`` x ``side`` bit for bit; "" when neither does.

    Pillow's resize is two such passes with 8-bit rounding between them, but which comes
    first depends on the sizes (and may on Pillow's version): random pixels tell.
    """
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    probe = np.random.default_rng(0).integers(0, 256, (1, *shape), dtype=np.uint8)
    want = np.asarray(Image.fromarray(probe[0]).resize((side, side), method))
    for order in ("xy", "yx"):
        got = probe
        for axis in order:
            got = _resize_pass(got, side, axis, method)
        if np.array_equal(got[0], want):
            return order
    return ""


def _resize_all(stack: np.ndarray, side: int, method: Image.Resampling) -> np.ndarray | None:
    """Pillow's resize of each of n images of one size to ``side`` x ``side``, bit for bit, in
    two Pillow calls, flattened to n rows; None when the passes do not reproduce it."""
    mode = "RGB" if stack.ndim == 4 else "L"
    order = _pass_order(mode, (stack.shape[2], stack.shape[1]), side, method)
    for axis in order:
        stack = _resize_pass(stack, side, axis, method)
    return stack.reshape(len(stack), -1) if order else None


def _reduce_group(images: list[Image.Image]) -> np.ndarray | None:
    """:func:`_reduce_one` of n images of one mode (L or RGB) and size, as n rows of grey image
    then thumbnail bytes; None when the passes do not reproduce Pillow's resize."""
    mode, (width, height), n = images[0].mode, images[0].size, len(images)
    strip = Image.new(mode, (width, n * height))
    for k, img in enumerate(images):  # a paste costs less than copying the pixels out
        strip.paste(img, (0, k * height))
    grey = strip if mode == "L" else strip.convert("L")
    rgb = strip if mode == "RGB" else strip.convert("RGB")
    greys = _resize_all(np.asarray(grey).reshape(n, height, width), _HASH_SIDE, Image.LANCZOS)
    thumbs = _resize_all(np.asarray(rgb).reshape(n, height, width, 3), THUMB_SIDE, Image.BOX)
    if greys is None or thumbs is None:
        return None
    return np.concatenate([greys, thumbs], axis=1)


def _row(reductions: tuple[bytes, bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(reductions), np.uint8)


def _reductions(smalls: Sequence[Small]) -> tuple[np.ndarray, np.ndarray]:
    """Each small's 32 x 32 grey image and thumbnail as one row of bytes (n x 1072), and which
    rows hold one; the small images are reduced in one batch per mode and size."""
    rows = np.zeros((len(smalls), _HASH_SIDE * _HASH_SIDE + THUMB_BYTES), np.uint8)
    present = np.zeros(len(smalls), bool)
    groups: dict[tuple[str, tuple[int, int]], list[int]] = {}
    for i, small in enumerate(smalls):
        if isinstance(small, Image.Image):
            groups.setdefault((small.mode, small.size), []).append(i)
        elif small is not None:
            rows[i], present[i] = _row(small), True
    for members in groups.values():
        images: list[Image.Image] = [smalls[i] for i in members]  # type: ignore[misc]
        batch = _reduce_group(images) if len(images) >= _MIN_BATCH else None
        if batch is not None:
            rows[members], present[members] = batch, True
            continue
        for i, img in zip(members, images, strict=True):  # a few, or not two passes: one by one
            one = _reduce_one(img)
            if one is not None:
                rows[i], present[i] = _row(one), True
    return rows, present


def phash_bits(greys: np.ndarray) -> np.ndarray:
    """imagehash.phash of n 32 x 32 grey images (n x 32 x 32, float64): n x 64 booleans."""
    # einsum's own loops, not BLAS: OpenBLAS threads in each decode worker, on cores the other
    # workers keep busy, made one batched matmul up to 30 times slower than this
    rows = np.einsum("nab,jb->naj", greys, _DCT)
    low = np.einsum("ia,naj->nij", _DCT, rows).reshape(len(greys), _LOW * _LOW)
    middle = np.sort(low, axis=1)[:, 31:33].mean(axis=1)  # numpy's median of 64 values
    return low > middle[:, None]


def fingerprints(smalls: Sequence[Small]) -> list[tuple[str | None, bytes | None]]:
    """(perceptual hash as hex, thumbnail bytes) of each output of :func:`reduced`;
    (None, None) for a missing or flat one."""
    prints: list[tuple[str | None, bytes | None]] = [(None, None)] * len(smalls)
    rows, present = _reductions(smalls)
    rows = rows[present]
    greys = rows[:, : _HASH_SIDE * _HASH_SIDE].astype(np.float64)
    # std >= _FLAT_STD without rounding: n * sum(x^2) - sum(x)^2 >= (n * _FLAT_STD)^2 in
    # integers below 2^53, which float64 holds exactly
    n = greys.shape[1]
    spread = n * np.einsum("ij,ij->i", greys, greys) - greys.sum(axis=1) ** 2
    textured = spread >= (n * _FLAT_STD) ** 2
    bits = phash_bits(greys.reshape(-1, _HASH_SIDE, _HASH_SIDE))[textured]
    hexes = np.packbits(bits, axis=1).tobytes().hex()
    thumbs = np.ascontiguousarray(rows[textured, _HASH_SIDE * _HASH_SIDE :]).tobytes()
    for k, i in enumerate(np.flatnonzero(present)[textured].tolist()):
        prints[i] = hexes[16 * k : 16 * (k + 1)], thumbs[THUMB_BYTES * k : THUMB_BYTES * (k + 1)]
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
    # nor can pairs whose three channel sums (16 values each) differ by more than 48 times it
    # in all: 3 numbers compared before 48, which drops most pairs of near-identical hashes
    channels = list(thumbs.reshape(len(thumbs), -1, 3).sum(axis=1).T.astype(np.int32))
    most_gap = THUMB_BYTES * max_colour + 1e-6
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
            near = sum(np.abs(c[a] - c[b]) for c in channels) <= most_gap
            a, b = a[near], b[near]
            same_colour = np.abs(thumbs[a] - thumbs[b]).mean(axis=1) <= max_colour
            found.append(np.stack([a[same_colour], b[same_colour]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found), axis=1)
    return np.unique(pairs, axis=0)


def _smallest_connected(pairs: np.ndarray, n: int) -> np.ndarray:
    """The smallest item of each item's connected component in the pair graph.

    Each round hooks the larger of two linked roots under the smaller, then points every item
    straight at its root; a round with no two linked roots apart ends it.
    """
    root = np.arange(n)
    a, b = pairs[:, 0], pairs[:, 1]
    while (root[a] != root[b]).any():
        np.minimum.at(root, np.maximum(root[a], root[b]), np.minimum(root[a], root[b]))
        while (root[root] != root).any():
            root = root[root]
    return root


def group_labels(pairs: np.ndarray, n: int) -> np.ndarray:
    """Connected components of the pair graph: a group number per item, -1 when alone.

    Groups are numbered in the order of their first member.
    """
    labels = np.full(n, -1, dtype=np.int64)
    if len(pairs) == 0:
        return labels
    in_pair = np.zeros(n, dtype=bool)
    in_pair[pairs.ravel()] = True
    first = _smallest_connected(pairs, n)[in_pair]  # also the component's first member
    labels[in_pair] = np.searchsorted(np.unique(first), first)
    return labels


def hashes_and_thumbs(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The ``perceptual_hash`` (hex) and ``colour_layout`` columns as uint64 and uint8 arrays."""
    hexes = bytes.fromhex("".join(df["perceptual_hash"]))
    hashes = np.frombuffer(hexes, dtype=">u8").astype(np.uint64)  # 16 hex digits, big-endian
    thumbs = np.frombuffer(b"".join(df["colour_layout"]), dtype=np.uint8)
    return hashes, thumbs.reshape(len(df), THUMB_BYTES)
