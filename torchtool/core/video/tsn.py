"""TSN frame sampling: K frame indices per video, and each video's own random generator."""

from __future__ import annotations

import os
import random

from torchtool.core.output import UsageError

# TSN uses 3 to 25 segments, dense sampling a few hundred; past this --segments is a typo
MAX_SEGMENTS = 10_000


def tsn_indices(n: int, k: int, mode: str, rng: random.Random | None = None) -> list[int]:
    """K frame indices of a video of ``n`` frames, the TSN way (0-based, non-decreasing, each in [0, n)).

    ``test``: the middle of each of K equal segments, tick = n / K, index_k = int(tick / 2 + tick * k)
    (n = 100, K = 3: 16, 50, 83). ``train``: one random frame inside each segment
    [floor(i n / K), floor((i + 1) n / K)); with fewer frames than K, K sorted random frames
    with repeats.
    """
    if not 1 <= k <= MAX_SEGMENTS:
        raise UsageError(f"--segments must be between 1 and {MAX_SEGMENTS}, not {k}")
    if n < 1:
        raise ValueError("0 frames: nothing to sample")
    if mode == "test":
        tick = n / k
        return [min(n - 1, int(tick / 2 + tick * i)) for i in range(k)]
    if mode != "train":
        raise UsageError(f"unknown --mode {mode!r}", hint="train or test")
    rng = rng or random.Random()
    if n < k:
        return sorted(rng.randrange(n) for _ in range(k))
    return [rng.randrange(i * n // k, (i + 1) * n // k) for i in range(k)]


def video_rng(seed: int, path: str | os.PathLike) -> random.Random:
    """The generator of one video: from the seed and the video's own path, so neither the order nor the
    number of workers changes its indices. Seeded with the path's bytes (what str() of a valid name
    encodes to), so a name that is not UTF-8 has a generator too."""
    return random.Random(f"{seed}:".encode() + os.fsencode(path))
