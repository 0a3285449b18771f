"""Bit strings and the watermark metrics: bit accuracy, all-bits-match share and PSNR.

A bit string is a uint8 array (n,) of 0/1, written as text '0101...' (first character = bit 0).
"""
from __future__ import annotations

import numpy as np

BITS_SEED_OFFSET = 0x5EED  # fixed_bits(n, seed) differs from the training stream of the same seed


def parse_bits(text: str, num_bits: int | None = None) -> np.ndarray:
    """'0101...' -> uint8 (n,); ValueError (one line) for other characters, an empty string or the wrong length."""
    text = str(text).strip()
    if not text:
        raise ValueError('the bit string is empty: give a string of 0s and 1s, e.g. --bits 0110...')
    bad = sorted(set(text) - {'0', '1'})
    if bad:
        raise ValueError(f'bad bit string {text[:80]!r}: it may hold only 0 and 1, found {"".join(bad)[:20]!r}')
    if num_bits is not None and len(text) != num_bits:
        raise ValueError(f'the bit string has {len(text)} bits but the codec encodes {num_bits}: give exactly '
                         f'{num_bits} 0s and 1s')
    return np.frombuffer(text.encode(), np.uint8) - ord('0')


def bits_to_str(bits) -> str:
    """uint8/bool/float (n,) of 0/1 -> '0101...'."""
    return ''.join('1' if b else '0' for b in np.asarray(bits).reshape(-1) > 0.5)


def fixed_bits(num_bits: int, seed: int) -> np.ndarray:
    """A fixed bit string uint8 (num_bits,) drawn from ``seed`` (same bits on every machine: numpy PCG64)."""
    if num_bits <= 0:
        raise ValueError(f'num_bits={num_bits} must be positive')
    return np.random.default_rng([BITS_SEED_OFFSET, int(seed)]).integers(0, 2, num_bits, dtype=np.uint8)


def make_bits(num_bits: int, text: str | None = None, seed: int | None = None) -> np.ndarray:
    """The watermark: ``text`` ('0101...', validated against ``num_bits``) if given, else :func:`fixed_bits` of
    ``seed`` (0 when both are None). uint8 (num_bits,)."""
    if text is not None and seed is not None:
        raise ValueError('give either a bit string or a bits seed, not both')
    if text is not None:
        return parse_bits(text, num_bits)
    return fixed_bits(num_bits, 0 if seed is None else seed)


def bit_accuracy(logits, bits) -> np.ndarray:
    """Per-sample fraction of matching bits: logits (B, n) (logit > 0 reads as 1), bits (B, n) or (n,) -> (B,)."""
    logits = np.asarray(logits)
    bits = np.broadcast_to(np.asarray(bits) > 0.5, logits.shape)
    return np.mean((logits > 0) == bits, axis=-1)


def all_match(logits, bits) -> np.ndarray:
    """Per-sample bool (B,): every bit decoded correctly. Its mean is the share of exactly recovered strings."""
    logits = np.asarray(logits)
    bits = np.broadcast_to(np.asarray(bits) > 0.5, logits.shape)
    return np.all((logits > 0) == bits, axis=-1)


def _unit(images) -> np.ndarray:
    images = np.asarray(images)
    return images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)


def psnr(a, b) -> np.ndarray:
    """Per-sample PSNR in dB (B,) of images (B, H, W, C) in [0, 1] (float) or uint8 (divided by 255; the two
    arguments may mix): 10 log10(1 / MSE); identical images give +inf."""
    a, b = _unit(a), _unit(b)
    if a.shape != b.shape:
        raise ValueError(f'psnr needs images of one shape, got {a.shape} and {b.shape}')
    mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
    with np.errstate(divide='ignore'):
        return 10.0 * np.log10(1.0 / mse)


def mean_psnr(a, b) -> float:
    """Mean over samples of :func:`psnr` (B, H, W, C) x2 -> float (inf only if every pair is identical)."""
    return float(np.mean(psnr(a, b)))
