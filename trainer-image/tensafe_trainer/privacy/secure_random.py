"""Randomness for the privacy mechanism: an AES-256-CTR keystream under a fresh 256-bit key.

Why not torch or numpy: their CPU generators are Mersenne Twisters seeded with at most 64 bits
(torch's CPU generator keeps 32), so whoever sees the weights before and after a step can brute-force
the seed and subtract the noise. Here every draw is keyed with 32 bytes from the OS's CSPRNG
(``secrets``), never from the user's seed, and the key is dropped once the draw is made.

- Uniforms: the keystream read as unsigned 64-bit words, top 53 bits, mapped onto (0, 1] in float64.
- Gaussians: Box-Muller in float64. Against the floating-point attack on Gaussian samplers (Holohan &
  Braghin 2021, the attack opacus' ``secure_mode`` answers), each returned value is the sum of four
  independent standard normals divided by two, as opacus does: the sum has the same distribution,
  but the lattice of values a single Box-Muller draw can reach, which the attack exploits, is gone.

A ``key`` (or a keyed ``KeyStream``) may be given for statistical tests (a fixed key makes a draw
reproducible); the mechanism itself never passes one.
"""

from __future__ import annotations

import math
import secrets
from typing import Optional

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
SECURE_SUMMANDS = 4  # standard normals summed per returned value (divided by sqrt(4) = 2)
_CHUNK = 1 << 15  # values generated at a time: 4 x 32K normals, 1 MiB of keystream


class KeyStream:
    """Uniform random words from AES-256-CTR; ``key`` None draws a fresh key from the OS."""

    def __init__(self, key: Optional[bytes] = None):
        key = secrets.token_bytes(KEY_BYTES) if key is None else key
        if len(key) != KEY_BYTES:
            raise ValueError(f"a keystream key is {KEY_BYTES} bytes, not {len(key)}")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytes(0)
        self._buffer = bytearray(16)

    def words(self, count: int) -> torch.Tensor:
        """``count`` random 64-bit words (int64). A view of a reused buffer: valid until the next call."""
        size = count * 8
        if len(self._zeros) < size:
            self._zeros = bytes(size)
            self._buffer = bytearray(size + 16)  # update_into wants a block of slack
        self._encryptor.update_into(memoryview(self._zeros)[:size], self._buffer)
        return torch.frombuffer(self._buffer, dtype=torch.int64, count=count)

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 values uniform on (0, 1], with 53 random bits each."""
        bits = torch.bitwise_and(torch.bitwise_right_shift(self.words(count), 11), (1 << 53) - 1)
        return bits.to(torch.float64).add_(1.0).mul_(2.0 ** -53)

    def normal(self, count: int) -> torch.Tensor:
        """``count`` independent standard normals in float64, by Box-Muller (a pair per two uniforms)."""
        half = (count + 1) // 2
        u = self.uniform(2 * half)
        radius = u[:half].log_().mul_(-2.0).sqrt_()
        angle = u[half:].mul_(2.0 * math.pi)
        return torch.cat([torch.cos(angle).mul_(radius), angle.sin_().mul_(radius)])[:count]


def add_secure_normal_(target: torch.Tensor, std: float, stream: Optional[KeyStream] = None) -> None:
    """``target += N(0, std^2)`` elementwise, each value the scaled sum of four standard normals from
    ``stream`` (default: a fresh CSPRNG key).

    Generated in float64 on the CPU a chunk at a time (so buffers stay small and warm) and added into
    ``target`` (float32 or wider; moved to its device chunk by chunk)."""
    if target.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"noise is added to a float32-or-wider sum, not {target.dtype}")
    stream = stream if stream is not None else KeyStream()
    flat = target.view(-1)
    scale = std / math.sqrt(SECURE_SUMMANDS)
    for start in range(0, flat.numel(), _CHUNK):
        size = min(_CHUNK, flat.numel() - start)
        noise = stream.normal(SECURE_SUMMANDS * size).view(SECURE_SUMMANDS, size).sum(dim=0)
        flat.narrow(0, start, size).add_(noise.to(target.device), alpha=scale)


def secure_normal(count: int, std: float, key: Optional[bytes] = None) -> torch.Tensor:
    """``count`` draws of N(0, std^2) in float64 (see :func:`add_secure_normal_`)."""
    out = torch.zeros(count, dtype=torch.float64)
    add_secure_normal_(out, std, KeyStream(key))
    return out


def bernoulli_mask(count: int, probability: float, key: Optional[bytes] = None) -> torch.Tensor:
    """``count`` independent Bernoulli(probability) draws (a bool tensor): Poisson sampling's coin flips.

    Each coin compares 53 random bits with floor(q 2^53), so its probability is q rounded down to a multiple
    of 2^-53: never above the q the accountant is given."""
    bits = torch.bitwise_and(torch.bitwise_right_shift(KeyStream(key).words(count), 11), (1 << 53) - 1)
    return bits < math.floor(probability * 2.0 ** 53)
