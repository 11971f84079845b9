"""Video metadata with OpenCV, exact frame counts, TSN frame sampling and frame extraction (no torch).

- :mod:`inputs`: which videos (files, folders, stdin, list files), in order.
- :mod:`container`: what a file is from its first bytes; an MP4's own frame timing.
- :mod:`capture`: OpenCV opened safely, frames grabbed past read errors, seeks checked.
- :mod:`metadata`: one video's row of metadata; :mod:`tsn`: TSN indices.
- :mod:`frames`: ``--extract-frames`` folders and their manifests; :mod:`run`: the rows of a run.
"""

from torchtool.core.video.capture import cv2, frames_at, opened, scan
from torchtool.core.video.frames import extract_frames, fingerprint, frame_folders
from torchtool.core.video.inputs import VIDEO_EXTENSIONS, VideoInput, find_videos, is_video_name
from torchtool.core.video.metadata import probe
from torchtool.core.video.run import VideoConfig, describe, describe_all, plan_frames
from torchtool.core.video.tsn import MAX_SEGMENTS, tsn_indices, video_rng

__all__ = ["MAX_SEGMENTS", "VIDEO_EXTENSIONS", "VideoConfig", "VideoInput", "cv2", "describe", "describe_all",
           "extract_frames", "fingerprint", "find_videos", "frame_folders", "frames_at", "is_video_name", "opened",
           "plan_frames", "probe", "scan", "tsn_indices", "video_rng"]
