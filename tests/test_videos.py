"""Rollout videos: decoding back, overlays, never overwriting; the review page in headless Chromium."""

import json
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from videos.overlay import CHUNK_MARK, HEADER, banner, compose, frame_size
from videos.recorder import VideoRecorder, keeps
from runners.review import write_review


def views(seed, size=224):
    """Smooth, camera-like content (pure noise is not what a video codec is for)."""
    y, x = np.mgrid[0:size, 0:size] / size
    def img(phase):
        chans = [np.sin(2 * np.pi * (x * (1 + c) + y * (2 - c) + phase)) for c in range(3)]
        return (127.5 * (1 + np.stack(chans, -1))).astype(np.uint8)
    return img(0.1 * seed), img(0.5 + 0.1 * seed)


def record(recorder, outcome, steps=15, init_state=0, chunk_every=5):
    video = recorder.start("libero_spatial", 3, init_state, 7, "put the bowl on the plate", 220, 224)
    for t in range(steps):
        image, wrist = views(t)
        video.add(image, wrist, t, chunk_start=t % chunk_every == 0)
    return recorder.finish(video, outcome)


def test_video_decodes_back_with_expected_frame_count_and_size(tmp_path):
    rec = VideoRecorder(tmp_path / "videos", videos="all", fps=20)
    path = record(rec, "failure", steps=15)
    assert rec.close() == []
    frames = imageio.mimread(tmp_path / path, memtest=False)
    height, width = frame_size(224)
    assert len(frames) == 15 + 20  # every step, then one second of the outcome banner
    assert frames[0].shape == (height, width, 3) == (272, 448, 3)
    reader = imageio.get_reader(tmp_path / path)
    meta = reader.get_meta_data()
    reader.close()
    assert meta["fps"] == 20 and "h264" in meta["codec"]
    # the views are where the layout says (lossy codec: compare loosely)
    image, wrist = views(0)
    assert np.abs(frames[0][HEADER:HEADER + 224, 224:448].astype(int) - wrist).mean() < 4
    assert np.abs(frames[0][HEADER:HEADER + 224, 0:224].astype(int) - image).mean() < 4


def test_overlays_change_the_pixels_where_expected():
    image, wrist = views(1)
    plain = compose(image, wrist, "stack the bowls", 3, 220, chunk_start=False)
    marked = compose(image, wrist, "stack the bowls", 3, 220, chunk_start=True)
    diff = np.any(plain != marked, axis=-1)
    ys, xs = np.nonzero(diff)
    dx, dy, size = CHUNK_MARK
    assert diff.any() and xs.min() >= 224 - dx - size - 1 and xs.max() <= 224 - dx + 1  # only the chunk mark
    assert ys.min() >= HEADER + dy - 1 and ys.max() <= HEADER + dy + size + 1
    other_step = compose(image, wrist, "stack the bowls", 13, 220, chunk_start=False)
    assert np.any(other_step[:HEADER] != plain[:HEADER]) and np.array_equal(other_step[HEADER:], plain[HEADER:])
    other_task = compose(image, wrist, "open the drawer", 3, 220, chunk_start=False)
    assert np.any(other_task[:HEADER] != plain[:HEADER])
    band = slice(plain.shape[0] // 2 - 20, plain.shape[0] // 2 + 20)
    for outcome, color in (("success", 1), ("failure", 0), ("error", 0)):
        b = banner(plain, outcome)
        assert np.array_equal(b[:band.start - 4], plain[:band.start - 4])  # above the band: untouched
        assert np.median(b[band, :, color]) > 100  # green band for success, red/orange otherwise
    with pytest.raises(ValueError, match="success, failure, error"):
        banner(plain, "draw")


def test_nothing_is_overwritten_across_episodes_with_the_same_outcome(tmp_path):
    rec = VideoRecorder(tmp_path / "videos", videos="failures")
    a = record(rec, "failure", steps=5, init_state=0)
    b = record(rec, "failure", steps=6, init_state=0)  # same episode key again (a retry)
    c = record(rec, "failure", steps=7, init_state=1)
    rec.close()
    assert len({a, b, c}) == 3
    counts = [len(imageio.mimread(tmp_path / p, memtest=False)) for p in (a, b, c)]
    assert counts == [25, 26, 27]


def test_videos_setting_decides_which_videos_stay(tmp_path):
    assert keeps("failures", "error") and keeps("failures", "failure") and not keeps("failures", "success")
    assert keeps("all", "success") and not keeps("none", "failure")
    rec = VideoRecorder(tmp_path / "videos", videos="failures")
    assert record(rec, "success", steps=4) is None
    assert record(rec, "error", steps=4) is not None
    rec.close()
    files = sorted(p.name for p in (tmp_path / "videos").rglob("*"))
    assert files == ["libero_spatial", "task03_init00_seed7_error.mp4"]
    with pytest.raises(ValueError, match="none, failures, all"):
        VideoRecorder(tmp_path, videos="some")


def test_an_episode_without_frames_names_no_video(tmp_path):
    """An episode that recorded no frame (an env without cameras, an episode that erred at reset) used to
    get a result line naming a video file that was never written."""
    rec = VideoRecorder(tmp_path / "videos", videos="all")
    assert record(rec, "failure", steps=0) is None
    kept = record(rec, "failure", steps=3, init_state=1)
    assert rec.close() == []
    assert kept is not None and (tmp_path / kept).is_file()
    assert [p.name for p in (tmp_path / "videos").rglob("*.mp4")] == [Path(kept).name]


def test_closing_with_episodes_still_running_discards_their_videos_at_once(tmp_path):
    """Ctrl-C mid-episode: the recorder is closed while episodes' videos have frames but no end. Their
    encoders are told to stop (no hang waiting for frames that never come), their partial files go, and
    a video that did end is still written."""
    import time

    rec = VideoRecorder(tmp_path / "videos", videos="all")
    done = record(rec, "failure", steps=5)
    running = [rec.start("libero_spatial", 4, i, 7, "open the drawer", 220, 224) for i in range(3)]
    for video in running:
        for t in range(4):
            video.add(*views(t), t, chunk_start=t == 0)
    start = time.monotonic()
    assert rec.close(timeout=20) == []
    assert time.monotonic() - start < 15
    assert not any(v.is_alive() for v in running)
    files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "videos").rglob("*.mp4"))
    assert files == [done]


def test_recording_memory_does_not_grow_with_the_episode(tmp_path):
    """A libero_10-length episode (520 steps, two 224 px views): Python-side memory (tracemalloc: numpy
    buffers, the queue, the encoder thread's frames) peaks far below what its frames take, and the
    same measurement does catch a recorder that keeps the frames."""
    import tracemalloc

    steps, size = 520, 224
    frames = [views(k, size) for k in range(3)]  # made before measuring; the recorder copies what it gets
    episode_bytes = steps * 2 * size * size * 3  # 156.5 MB: every frame of the episode, kept
    bound = episode_bytes // 5

    rec = VideoRecorder(tmp_path / "videos", videos="all")
    tracemalloc.start()
    try:
        video = rec.start("libero_10", 0, 0, 7, "long task", steps, size)
        for t in range(steps):
            video.add(*frames[t % 3], t, chunk_start=t % 10 == 0)
        path = rec.finish(video, "failure")
        assert rec.close() == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    tracemalloc.start()  # the control: a recorder that buffered the episode would measure like this
    try:
        kept = [(np.array(frames[t % 3][0]), np.array(frames[t % 3][1])) for t in range(steps)]
        _, peak_kept = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    assert peak_kept >= episode_bytes > bound
    assert peak < bound, f"recording peaked at {peak / 1e6:.1f} MB (bound {bound / 1e6:.1f} MB)"
    reader = imageio.get_reader(tmp_path / path)
    try:
        assert reader.count_frames() == steps + 20  # every step was encoded, then the banner second
    finally:
        reader.close()


def _fake_evaluation(root: Path, job: str, outcomes):
    """An evaluation directory like the runner writes, with real videos."""
    d = root / job
    rec = VideoRecorder(d / "videos", videos="failures")
    lines = []
    for k, outcome in enumerate(outcomes):
        video = record(rec, outcome, steps=8, init_state=k)
        lines.append({"suite": "libero_spatial", "task_id": 3, "task": "put the bowl on the plate", "init_state_id": k,
                      "seed": 7, "success": outcome == "success", "env_steps": 8,
                      "error": "RuntimeError: boom" if outcome == "error" else "",
                      "latency_p50_ms": 12.5, "latency_p95_ms": 20.0, "video": video, "config_hash": "abc"})
    rec.close()
    (d / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def test_review_page_renders_in_headless_chromium_and_plays_every_failure(tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium package is needed for this test (make test installs it)"
    root = tmp_path / "sweep"
    _fake_evaluation(root, "job0_steps=1", ["failure", "success", "error"])
    _fake_evaluation(root, "job1_steps=3", ["failure", "failure"])
    page_path = write_review(root)
    html = page_path.read_text()
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # self-contained
    assert html.count("<script>") == 1 and 'preload="none"' in html and " src=" not in html  # videos load lazily
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                     "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        assert page.locator("video").count() == 4  # 2 failures + 1 error, 2 failures; no video for the success
        for i in range(4):  # a video gets its source when it scrolls near the viewport
            page.locator("video").nth(i).scroll_into_view_if_needed()
        page.wait_for_function("[...document.querySelectorAll('video')].every(v => v.getAttribute('src'))")
        states = page.evaluate("""async () => Promise.all([...document.querySelectorAll('video')].map(v =>
            new Promise(done => {
              const report = () => done({ready: v.readyState, error: v.error && v.error.code, width: v.videoWidth});
              if (v.readyState >= 2) return report();
              v.addEventListener('loadeddata', report); v.addEventListener('error', report); v.load();
            })))""")
        assert all(s["error"] is None and s["ready"] >= 2 and s["width"] == 448 for s in states), states
        page.locator("video").first.evaluate("v => v.play()")
        page.wait_for_timeout(300)
        assert page.locator("video").first.evaluate("v => v.currentTime") > 0
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        # the tag filter hides the unticked tag's episodes (results without tags fall back to the outcome)
        assert page.locator('[data-failure="error"]').is_visible()
        page.locator('#filters input[data-tag="error"]').uncheck()
        assert not page.locator('[data-failure="error"]').is_visible()
        assert page.locator('[data-failure="untagged"]').first.is_visible()
        browser.close()
    assert problems == []
    assert (tmp_path / "review.png").stat().st_size > 10_000
    assert "RuntimeError: boom" in html and "init state 2" in html


def test_review_command_requires_results(tmp_path, capsys):
    from runners.review import main

    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no results.jsonl" in capsys.readouterr().err


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _job(root: Path, name: str, steps: int, outcomes, videos="all", lengths=None, tags=None):
    """A sweep job like the runner writes: summary.json (the resolved config), results with failure tags
    and, for videos=all, real videos of every episode."""
    d = root / name
    rec = VideoRecorder(d / "videos", videos=videos)
    lines = []
    for k, outcome in enumerate(outcomes):
        video = record(rec, outcome, steps=(lengths or [8] * len(outcomes))[k], init_state=k)
        lines.append({"suite": "libero_spatial", "task_id": 3, "task": "put the bowl on the plate", "init_state_id": k,
                      "seed": 7, "success": outcome == "success", "env_steps": 8, "error": "",
                      "failure": "success" if outcome == "success" else (tags or {}).get(k, "grasp_failed"),
                      "video": video, "config_hash": f"h{steps}"})
    rec.close()
    (d / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = {"suite": "libero_spatial", "steps": steps, "replan": 5, "policy": {"_target_": "policy.simple.ZeroPolicy"}}
    (d / "summary.json").write_text(json.dumps({"config": cfg, "policy_name": "zero", "config_hash": f"h{steps}"}))
    return d


def test_side_by_side_plays_both_configurations_under_one_control(tmp_path):
    from playwright.sync_api import sync_playwright

    root = tmp_path / "sweep"
    _job(root, "job0_steps=1", 1, ["failure", "success", "failure"], lengths=[20, 8, 8], tags={0: "dropped"})
    _job(root, "job1_steps=10", 10, ["success", "success", "failure"], lengths=[12, 8, 8])
    html = write_review(root).read_text()
    # discordant episodes first, before the per-job galleries; both configurations named
    assert html.index("Side by side") < html.index("Succeeded in one") < html.index("Failed in both") < html.index(
        '<h2 id="job0">job0_steps=1</h2>')
    assert "A: steps=1 (job0)" in html and "B: steps=10 (job1)" in html
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto((root / "review.html").as_uri())
        pair = page.locator(".pair").first
        videos = pair.locator("video")
        assert videos.count() == 2
        pair.locator("button").click()
        page.wait_for_function("""() => [...document.querySelector('.pair').querySelectorAll('video')]
                                  .every(v => v.currentTime > 0.2 && !v.paused)""", timeout=10_000)
        pair.locator("button").click()
        times = videos.evaluate_all("vs => vs.map(v => [v.paused, v.currentTime])")
        assert all(paused for paused, _ in times) and abs(times[0][1] - times[1][1]) < 0.25, times
        # seek both to 40% of the longer video (A: 20 steps + 1 s banner = 2.0 s; B: 1.6 s)
        pair.locator("input[type=range]").evaluate("r => { r.value = 400; r.dispatchEvent(new Event('input')); }")
        page.wait_for_timeout(200)
        assert videos.evaluate_all("vs => vs.map(v => v.currentTime)") == pytest.approx([0.8, 0.8], abs=0.06)
        pair.locator("input[type=range]").evaluate("r => { r.value = 950; r.dispatchEvent(new Event('input')); }")
        page.wait_for_timeout(200)
        a, b = videos.evaluate_all("vs => vs.map(v => [v.currentTime, v.duration])")
        assert a[0] == pytest.approx(0.95 * a[1], abs=0.06) and b[0] == pytest.approx(b[1], abs=0.06)  # B clamped at its end
        page.screenshot(path=str(tmp_path / "pairs.png"))
        browser.close()
    assert problems == []


def test_review_page_of_2000_episodes_is_light_and_loads_fast(tmp_path):
    """2,000 episodes in a two-job sweep (1,000 each, most without a video file on disk): the page stays a
    few MB, Chromium opens it in seconds, and only videos near the viewport get a source."""
    import time

    from playwright.sync_api import sync_playwright

    root = tmp_path / "sweep"
    tags = ["never_reached", "grasp_failed", "dropped", "misplaced", "timeout_near_goal", "stuck", "success"]
    for job, steps in (("job0_steps=1", 1), ("job1_steps=10", 10)):
        d = root / job
        d.mkdir(parents=True)
        lines = []
        for n in range(1000):
            tag = tags[(n * (3 if steps == 1 else 5)) % len(tags)]
            lines.append({"suite": "libero_spatial", "task_id": n % 10, "task": f"task {n % 10}", "init_state_id": n // 20,
                          "seed": 7 + (n // 10) % 2, "success": tag == "success", "env_steps": 220, "error": "",
                          "failure": tag, "video": f"videos/libero_spatial/ep{n}.mp4", "config_hash": f"h{steps}"})
        (d / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        cfg = {"suite": "libero_spatial", "steps": steps, "policy": {"_target_": "policy.simple.ZeroPolicy"}}
        (d / "summary.json").write_text(json.dumps({"config": cfg, "policy_name": "zero"}))
    real = _job(tmp_path / "real", "job", 1, ["failure"] * 3)  # a few real video files, copied in
    for n in range(3):
        src = real / json.loads((real / "results.jsonl").read_text().splitlines()[n])["video"]
        dst = root / "job0_steps=1" / "videos" / "libero_spatial" / f"ep{n * 7}.mp4"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    t0 = time.perf_counter()
    page_path = write_review(root)
    write_s = time.perf_counter() - t0
    size = page_path.stat().st_size
    assert size < 4_000_000 and write_s < 20, (size, write_s)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        problems = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        t0 = time.perf_counter()
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        load_s = time.perf_counter() - t0
        counts = page.evaluate("""() => ({cards: document.querySelectorAll('.card').length,
            pairs: document.querySelectorAll('.pair').length,
            videos: document.querySelectorAll('video').length,
            loading: [...document.querySelectorAll('video')].filter(v => v.getAttribute('src')).length})""")
        page.screenshot(path=str(tmp_path / "big.png"))
        browser.close()
    assert load_s < 10, load_s
    assert problems == []
    # 3 real videos (failures of job0) with cards; their pairs are only listed where a job has the video on disk
    assert counts["cards"] > 1500 and counts["pairs"] > 100 and counts["videos"] >= 3 and counts["loading"] <= 6, counts
