"""Frame sampling: TSN's K segments, frames at a fixed rate or every N-th, and each video's own generator."""

from __future__ import annotations

import math
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


def rate_indices(n: int, video_fps: float, fps: float) -> list[int]:
    """The frames at ``fps`` per second of the video's own timeline: frame j is the one showing at
    t_j = j / fps (j = 0, 1, ... while t_j < n / video_fps), index floor(t_j * video_fps); an index
    met twice (``fps`` above the video's rate) is kept once."""
    if not fps > 0:
        raise UsageError(f"--fps must be above 0, not {fps}")
    if not video_fps > 0:
        raise ValueError("the video has no frame rate: use --every N or --segments K")
    step = video_fps / fps
    count = math.ceil(n / step - 1e-9)
    return sorted({min(n - 1, math.floor(j * step + 1e-6)) for j in range(count)})


def every_indices(n: int, every: int) -> list[int]:
    """Frames 0, N, 2N, ... of a video of ``n`` frames."""
    if every < 1:
        raise UsageError(f"--every must be 1 or more, not {every}")
    return list(range(0, n, every))


def video_rng(seed: int, path: str | os.PathLike) -> random.Random:
    """The generator of one video: from the seed and the video's own path, so neither the order nor the
    number of workers changes its indices. Seeded with the path's bytes (what str() of a valid name
    encodes to), so a name that is not UTF-8 has a generator too."""
    return random.Random(f"{seed}:".encode() + os.fsencode(path))
