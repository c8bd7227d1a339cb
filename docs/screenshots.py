"""Take the Batch Monitor's screenshots in docs/images/ (run by hand, not by the suite):

    .venv/bin/python docs/screenshots.py

Starts a quickcluster of its own (its own state, config and ports, on loopback), runs a
small batch on it (a POV-Ray animation and a transcode of a clip made with ffmpeg's
lavfi), and saves three 1280x800 screenshots taken in Debian's chromium through
Playwright: the batches, a job with its frames and timeline, a segment's log. Each is
reduced to a 128-colour PNG by ffmpeg, so that it stays small in the repository.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from farm.credentials import ClientFile

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
SCENE = ROOT / "examples" / "povray" / "bouncing.pov"
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 800}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.3)
    raise SystemExit(f"screenshots: gave up waiting for {what}")


def write_profile(folder: Path, name: str, body: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **body}))
    return path


def shrink(png: Path) -> None:
    """A 128-colour palette PNG: a page's flat colours lose nothing a reader sees."""
    smaller = png.with_suffix(".small.png")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(png), "-vf",
                    "split[a][b];[a]palettegen=max_colors=128:stats_mode=single[p];[b][p]paletteuse=dither=none",
                    "-compression_level", "9", str(smaller)], check=True)
    smaller.replace(png)


def main() -> None:
    from farm.credentials import QUICKCLUSTER_FILE, running_quickcluster

    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="farm-screenshots-") as tmp_name:
        tmp = Path(tmp_name)
        config = tmp / "farm.yaml"
        config.write_text(yaml.safe_dump({"node": {"allow_commands": ["ffmpeg", sys.executable]}}))
        env = {**os.environ, "FARM_STATE": str(tmp / "state"), "FARM_CONFIG": str(config),
               "XDG_CONFIG_HOME": str(tmp / "config"), "FARM_CONTROLLER": "", "FARM_CLIENT": ""}
        cluster = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "quickcluster", "--host", "127.0.0.1", "--slots", "2",
             "--api-port", str(free_port()), "--port", str(free_port())],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "quickcluster.log", "w"), start_new_session=True)
        try:
            client_path = tmp / "config" / "farm" / QUICKCLUSTER_FILE
            client = wait_until(lambda: running_quickcluster(client_path) if client_path.exists() else None, 120,
                                "the quickcluster's client file")
            take(client, tmp)
        finally:
            os.killpg(cluster.pid, signal.SIGTERM)
            cluster.wait(timeout=60)
    for png in sorted(IMAGES.glob("monitor-*.png")):
        print(f"{png.relative_to(ROOT)}: {png.stat().st_size // 1024} KiB")


def take(client: ClientFile, tmp: Path) -> None:
    from playwright.sync_api import sync_playwright

    url = client.urls[0]
    http = httpx.Client(base_url=url, verify=client.client_ssl_context(), timeout=60,
                        headers={"Authorization": f"Bearer {client.token}"})
    wait_until(lambda: http.get("/api/nodes").json(), 120, "the quickcluster's node")
    scenes = tmp / "scenes"  # a copy, so that the pictures show no path of this checkout
    scenes.mkdir()
    for part in SCENE.parent.glob("bouncing.*"):
        (scenes / part.name).write_bytes(part.read_bytes())
    clip = tmp / "trailer.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25:duration=8",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip)], check=True)
    render = write_profile(tmp, "povray-shot", {
        "processor": "imageseq", "frames": "1-12", "segment": {"frames": 2},
        "settings": {"renderer": "povray", "output": "shot_####.png", "width": 480, "height": 360}})
    encode = write_profile(tmp, "h264-proxy", {
        "processor": "transcode", "segment": {"seconds": 2}, "output": "{stem}-proxy.mp4",
        "settings": {"container": "mp4", "video": {"codec": "libx264", "crf": 26, "preset": "veryfast",
                                                   "height": 360}}})
    jobs = []
    for profile, inputs, dest in ((encode, [str(clip)], "proxies"), (render, [str(scenes / SCENE.name)], "shots")):
        answer = http.post("/api/batches", json={"profile": str(profile), "inputs": inputs,
                                                 "destination": str(tmp / dest)})
        answer.raise_for_status()
        jobs.append(answer.json())
    for submitted in jobs:
        job_id = submitted["jobs"][0]["id"]
        wait_until(lambda: http.get(f"/api/jobs/{job_id}").json()["state"] == "done", 300, f"job {job_id}")
    shot_batch, shot_job = jobs[1]["batch"], jobs[1]["jobs"][0]["id"]
    proxy_batch = jobs[0]["batch"]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_context(ignore_https_errors=True, viewport=VIEWPORT).new_page()
        page.goto(f"{url}/#token={client.token}")
        page.wait_for_selector("#live[data-state=live]", timeout=30000)
        for batch in (shot_batch, proxy_batch):
            page.locator(f"#batch-{batch} .head").click()
        page.wait_for_function("[...document.querySelectorAll('img.thumb')].filter((i) => i.naturalWidth).length >= 2",
                               timeout=30000)
        page.screenshot(path=str(IMAGES / "monitor-batches.png"))
        shrink(IMAGES / "monitor-batches.png")

        page.locator(f"tr[data-job='{shot_job}']").click()
        page.wait_for_function("document.querySelectorAll('#strip img').length === 6", timeout=30000)
        page.wait_for_function("[...document.querySelectorAll('#strip img')].every((i) => i.naturalWidth)")
        page.locator("#job-detail").scroll_into_view_if_needed()
        page.screenshot(path=str(IMAGES / "monitor-job.png"))
        shrink(IMAGES / "monitor-job.png")

        page.locator(".seg[data-state=done]").first.click()
        page.wait_for_selector("#log:not([hidden])")
        page.locator("#log").scroll_into_view_if_needed()
        page.screenshot(path=str(IMAGES / "monitor-log.png"))
        shrink(IMAGES / "monitor-log.png")
        browser.close()
    http.close()


if __name__ == "__main__":
    main()
