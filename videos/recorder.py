"""Rollout videos: an H.264 MP4 per episode, encoded while the episode runs.

Each episode streams its frames through a small bounded queue to a background thread that draws
the overlays and pipes them into the ffmpeg binary shipped by imageio-ffmpeg (a separate process,
so encoding runs in parallel with the simulator). Memory per episode is bounded by the queue,
whatever the episode length. The video is written to a `.partial.mp4` file; when the episode ends
the outcome banner is appended and the file is renamed to its final name if the `videos` setting wants it
(`all`, or `failures` for failed and errored episodes), or deleted.
"""

from __future__ import annotations

import queue
import threading
import uuid
from pathlib import Path

import numpy as np

from videos.overlay import banner, compose, frame_size

VIDEOS = ("none", "failures", "all")  # which episodes keep their video (the `videos` setting)
PARTIAL = ".partial.mp4"
BANNER_SECONDS = 1.0
QUEUE_FRAMES = 32


def keeps(videos: str, outcome: str) -> bool:
    if videos not in VIDEOS:
        raise ValueError(f"unknown videos setting {videos!r}; choose one of {', '.join(VIDEOS)}")
    return videos == "all" or (videos == "failures" and outcome != "success")


def unique_path(path: Path, reserved: set[Path] = frozenset()) -> Path:
    """`path`, or `path` with _2, _3, ... before the suffix if that name is taken: never overwrite."""
    candidate, n = path, 1
    while candidate.exists() or candidate in reserved:
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


class EpisodeVideo:
    """Frames of one episode, encoded in the background. Call `add` per step, then `finish` once."""

    def __init__(self, partial_path: Path, task: str, max_steps: int, view: int, fps: int = 20):
        self.partial_path = Path(partial_path)
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        self.task, self.max_steps, self.fps = task, max_steps, fps
        self.final_path: Path | None = None
        self.stem = self.partial_path.name[: -len(PARTIAL)]
        self.error: BaseException | None = None
        self.ended = False  # `finish` called
        self.frames = 0  # frames handed to `add` (0: nothing to keep, e.g. without cameras)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self._last: np.ndarray | None = None
        height, width = frame_size(view)
        import imageio_ffmpeg  # here, not at import: videos=none needs no ffmpeg at all

        self._writer = imageio_ffmpeg.write_frames(
            str(self.partial_path),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,
            output_params=["-crf", "23", "-preset", "veryfast", "-movflags", "+faststart"],
            macro_block_size=16,
            ffmpeg_log_level="error",
        )
        self._thread = threading.Thread(target=self._encode, name=f"video-{self.partial_path.stem}", daemon=True)
        self._thread.start()

    def add(self, image: np.ndarray, wrist: np.ndarray, step: int, chunk_start: bool) -> None:
        # Copies: the caller's observation buffers are reused by the vector env.
        self.frames += 1
        self._queue.put(("frame", (np.array(image), np.array(wrist), int(step), bool(chunk_start))))

    def finish(self, outcome: str, final_path: Path | None) -> None:
        """End the episode; `final_path` None discards the video. Returns at once; see `wait`."""
        self.ended = True
        self._queue.put(("end", (outcome, final_path)))

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _encode(self) -> None:
        try:
            self._writer.send(None)  # start ffmpeg
            while True:
                kind, payload = self._queue.get()
                if kind == "frame":
                    image, wrist, step, chunk_start = payload
                    self._last = compose(image, wrist, self.task, step, self.max_steps, chunk_start)
                    self._writer.send(self._last)
                    continue
                outcome, final_path = payload
                if final_path is not None and self._last is not None:
                    end = banner(self._last, outcome)
                    for _ in range(max(1, int(BANNER_SECONDS * self.fps))):
                        self._writer.send(end)
                self._writer.close()
                if final_path is not None and self._last is not None:
                    final_path.parent.mkdir(parents=True, exist_ok=True)
                    self.partial_path.replace(final_path)
                    self.final_path = final_path
                else:
                    self.partial_path.unlink(missing_ok=True)
                return
        except BaseException as exc:  # surfaced through `error`; never kill the evaluation
            self.error = exc
            try:
                self._writer.close()
            except Exception:
                pass
            self.partial_path.unlink(missing_ok=True)
            while True:  # drain so a producer blocked on a full queue can go on
                try:
                    if self._queue.get(timeout=0.5)[0] == "end":
                        return
                except queue.Empty:
                    return


class VideoRecorder:
    """Videos of an evaluation's episodes under `root`, named uniquely per suite/task/init state/config."""

    def __init__(self, root: str | Path, videos: str = "failures", fps: int = 20, tag: str = ""):
        keeps(videos, "failure")  # validates `videos`
        self.root, self.videos, self.fps, self.tag = Path(root), videos, fps, tag
        self._open: list[EpisodeVideo] = []
        self._errors: list[BaseException] = []
        self._reserved: set[Path] = set()  # names handed out whose files the encoder has not renamed yet
        if self.root.exists():  # leftovers of a killed run
            for stale in self.root.rglob("*" + PARTIAL):
                stale.unlink(missing_ok=True)

    def _stem(self, suite: str, task_id: int, init_state_id: int, seed: int) -> str:
        tag = f"_{self.tag}" if self.tag else ""
        return f"{suite}/task{task_id:02d}_init{init_state_id:02d}_seed{seed}{tag}"

    def start(self, suite: str, task_id: int, init_state_id: int, seed: int, task: str, max_steps: int,
              view: int) -> EpisodeVideo | None:
        if self.videos == "none":
            return None
        self._prune()
        stem = self._stem(suite, task_id, init_state_id, seed)
        # A random infix keeps concurrent or retried episodes of the same key apart while they run.
        video = EpisodeVideo(self.root / f"{stem}.{uuid.uuid4().hex[:8]}{PARTIAL}", task, max_steps, view, self.fps)
        video.stem = stem
        self._open.append(video)
        return video

    def finish(self, video: EpisodeVideo | None, outcome: str) -> str | None:
        """Close the episode's video; returns its final path relative to `root`'s parent, or None."""
        if video is None:
            return None
        final = None
        if keeps(self.videos, outcome) and video.frames:  # no frames, no file: a result line must not name one
            final = unique_path(self.root / f"{video.stem}_{outcome}.mp4", self._reserved)
            self._reserved.add(final)
        video.finish(outcome, final)
        return None if final is None else str(final.relative_to(self.root.parent))

    def _prune(self) -> None:
        alive = []
        for video in self._open:
            if video.is_alive():
                alive.append(video)
            elif video.error is not None:
                self._errors.append(video.error)
        self._open = alive

    def close(self, timeout: float = 60.0) -> list[BaseException]:
        """Wait for every video to be written; returns the encoding errors met, if any. Videos of
        episodes that never ended (Ctrl-C, a crash) are discarded: their encoder would otherwise wait
        for frames that never come, and a partial episode has no outcome to show."""
        for video in self._open:
            if not video.ended:
                video.finish("interrupted", None)
        for video in self._open:
            video.wait(timeout)
        self._prune()
        errors, self._errors = self._errors, []
        return errors
