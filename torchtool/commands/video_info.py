"""torchtool video-info: video metadata at scale, exact frame counts, TSN frame sampling, frames out."""

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from torchtool.commands._options import Format, Json, Overwrite, Quiet, Seed, Strict
from torchtool.core import output
from torchtool.core.runtime import available_cpus
from torchtool.core.video.tsn import MAX_SEGMENTS


def run(
    paths: Annotated[Optional[list[str]], typer.Argument(
        show_default=False, help="Video files, folders (searched recursively), or - for paths "
        "on stdin.")] = None,
    list_file: Annotated[Optional[Path], typer.Option(
        "--list", metavar="FILE", show_default=False, help="A file of video paths, one per line.")] = None,
    exact: Annotated[bool, typer.Option(
        "--exact", help="Decode every frame: exact_frame_count, and the duration and rates from the frames' "
        "timestamps.")] = False,
    segments: Annotated[Optional[int], typer.Option(
        "--segments", "-k", min=1, max=MAX_SEGMENTS, metavar="K", show_default=False,
        help="Add K frame indices per video, sampled the TSN way (field indices).")] = None,
    mode: Annotated[Literal["train", "test"], typer.Option(
        "--mode", help="test: each segment's middle frame; train: a random frame in each segment.")] = "test",
    seed: Seed = 0,
    extract_frames: Annotated[Optional[Path], typer.Option(
        metavar="DIR", show_default=False, help="Write the sampled frames as DIR/<video path>/<index>.jpg "
        "(needs --segments); a rerun skips videos whose frames are all there.")] = None,
    quality: Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG quality of --extract-frames.")
                       ] = 95,
    overwrite: Overwrite = False,
    workers: Annotated[int, typer.Option(
        "--workers", "-j", min=1, help="Threads: videos read at once (OpenCV decodes outside the GIL).")
                       ] = available_cpus(),
    strict: Strict = False,
    format: Format = "table",
    json_: Json = False,
    quiet: Quiet = False,
) -> None:
    """Width, height, frame rates, frame count, duration, codec and rotation of each video, in input order.

    Imports no torch: OpenCV (FFmpeg) reads the containers, several at once. Unreadable, empty and non-video files get a row with an error (exit 3; --strict fails on the first).
    """
    from torchtool.core.files import writable_dir
    from torchtool.core.video import VideoConfig, describe_all, find_videos, plan_frames

    fmt = output.pick_format(format, json_)
    if extract_frames and segments is None:
        raise output.UsageError("--extract-frames needs --segments K (which frames to write)")
    videos = find_videos(paths or [], list_file)
    if extract_frames:
        writable_dir(extract_frames, "--extract-frames")
        videos = plan_frames(videos, extract_frames)
    cfg = VideoConfig(exact, segments, mode, seed, quality, overwrite)
    rows = []
    with output.progress(total=len(videos), desc="videos", unit="video", quiet=quiet) as bar:
        for row in describe_all(videos, cfg, workers):
            if row["error"] and strict:
                raise output.Failure(f"cannot read {row['path']}: {row['error']}",
                                     hint="drop --strict to report the others and keep going")
            rows.append(row)
            bar.update(1)
    output.emit(rows, fmt)
    errors = sum(1 for r in rows if r["error"])
    if errors:
        output.warn(f"{errors} of {len(rows)} videos could not be read (see the error column)")
        raise typer.Exit(output.EXIT_PARTIAL)
