"""`sdlora ui` in a real browser: headless Debian chromium driven by Playwright (never
`playwright install`: it uses /usr/bin/chromium, which .ci/run installs), with every request
that leaves 127.0.0.1 blocked and recorded, so the test also shows the UI works offline.

The run: build the demo dataset (uploads included), edit a tag on one image and across the set,
start a short training on the embedded base, see the loss curve and a preview arrive, open the
grids, download the adapter; and the refusals a user meets in the page: a traversal path, a
non-image and an oversized upload, an out-of-range value, a second training on a busy folder.
SDLORA_UI_SCREENSHOTS=DIR keeps the page screenshots there (the README's samples/ui_*.png).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import free_port

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")
CHROMIUM = Path("/usr/bin/chromium")
# In the default tier: ~45 s on 2 quiet cores (a UI server, the tagger, a training and previews in their own
# processes); .ci/run installs chromium where it is missing.
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
CONFIG = """name = "demo"
trigger = "clrscn"
[dataset]
image_dir = "demo"
num_repeats = 1
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
max_pixels = 120000
[caption]
blacklist = ["landscape", "scenery", "outdoors"]
[network]
dim = 4
alpha = 2
[train]
epochs = 2
batch_size = 2
lr_scheduler = "constant"
[sample]
prompts = ["clrscn, mountains, lake"]
seeds = [1]
every_n_epochs = 1
preview_steps = 8
[output]
dir = "../output/demo"
"""


@pytest.fixture
def ui(tmp_path):
    """`sdlora ui --root PROJECT --port N` as a user starts it; yields (url, project folder)."""
    images = tmp_path / "datasets_cfg" / "demo"
    images.mkdir(parents=True)
    demo = sorted((REPO / "datasets_cfg" / "colorful_scenery").glob("*.png"))
    for p in demo[:2]:
        shutil.copy(p, images)
    (tmp_path / "datasets_cfg" / "demo.toml").write_text(CONFIG)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "sdlora.cli", "ui", "--root", str(tmp_path), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, server.stdout.read().decode()
            time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}/", tmp_path, demo[2:4]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_whole_job_in_a_browser(ui, tmp_path_factory):
    from PIL import Image

    url, root, uploads = ui
    expect = sync_api.expect
    shots = Path(os.environ.get("SDLORA_UI_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    scratch = tmp_path_factory.mktemp("uploads")
    (scratch / "notes.png").write_text("a text file named like an image")
    Image.new("RGB", (400, 400), "red").save(scratch / "huge.png")  # over max_pixels = 120000
    outside = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)

        def route(r):  # the network is closed: only the UI itself answers
            if r.request.url.startswith("http://127.0.0.1"):
                r.continue_()
            else:
                outside.append(r.request.url)
                r.abort()

        page.route("**/*", route)
        page.goto(url)
        message = page.locator("#message")
        expect(message).to_contain_text("no dataset built yet", timeout=30_000)

        # add images by upload: two scenery images pass, a non-image and an oversized image are refused
        page.locator("#upload input[type=file]").set_input_files([*map(str, uploads), str(scratch / "notes.png"),
                                                                  str(scratch / "huge.png")])
        expect(page.locator("#upload")).to_contain_text("huge", timeout=30_000)  # the uploads arrived
        page.locator("#add-upload").click()
        expect(message).to_contain_text("added 2 image(s)", timeout=30_000)
        expect(message).to_contain_text("notes.png: not an image")
        expect(message).to_contain_text("huge.png: too large")
        assert sorted(p.name for p in (root / "datasets_cfg" / "demo").glob("*.png")) == \
            sorted([*(p.name for p in uploads), "scene_00.png", "scene_01.png"])

        # a traversal path gets a message and reads nothing
        page.locator("#folder textarea, #folder input").first.fill("../../etc")
        page.locator("#add-folder").click()
        expect(message).to_contain_text("outside the project folder", timeout=15_000)

        # build the dataset: the embedded tagger writes captions
        page.locator("#build").click()
        expect(message).to_contain_text("4 kept", timeout=120_000)
        expect(page.locator("#gallery img")).to_have_count(4)

        # one image's tags, then a tag across the set
        page.locator("#gallery img").first.click()
        tags = page.locator("#tags textarea")
        expect(tags).not_to_have_value("")
        tags.fill("clrscn, edited in the browser")
        page.locator("#save-tags").click()
        expect(message).to_contain_text("saved the tags", timeout=60_000)
        edited = [p for p in (root / "datasets_cfg" / "demo").glob("*.txt")
                  if p.read_text() == "clrscn, edited in the browser\n"]
        assert len(edited) == 1
        page.locator("#bulk-tag textarea, #bulk-tag input").first.fill("browser tag")
        page.locator("#bulk-apply").click()
        expect(message).to_contain_text("4 caption(s) changed", timeout=60_000)
        captions = [p.read_text() for p in (root / "datasets_cfg" / "demo").glob("*.txt")]
        assert len(captions) == 4 and all(c.rstrip().endswith(", browser tag") for c in captions)
        expect(page.locator("#freq")).to_contain_text("browser tag", timeout=15_000)
        page.screenshot(path=str(shots / "ui_dataset.png"), full_page=True)

        # train: an out-of-range value is refused with the CLI's words, then a short training runs
        page.get_by_role("tab", name="Train").click()
        epochs = page.locator("#f-train-epochs input[type=number]")
        epochs.fill("0")
        page.locator("#check").click()
        expect(message).to_contain_text("[train] epochs: 0 is below the minimum 1", timeout=30_000)
        epochs.fill("2")
        page.locator("#check").click()
        expect(page.locator("#plan")).to_contain_text("4 steps", timeout=60_000)
        page.locator("#start").click()
        expect(message).to_contain_text("training started", timeout=60_000)
        page.locator("#start").click()  # a second training on the busy folder
        expect(message).to_contain_text("in use by another sdlora training", timeout=30_000)
        progress = page.locator("#progress")
        expect(progress).to_contain_text("finished", timeout=240_000)
        expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible(timeout=15_000)
        expect(page.locator("#previews img").first).to_be_visible(timeout=15_000)
        expect(progress).to_contain_text("step 4 / 4")
        page.screenshot(path=str(shots / "ui_train.png"))

        # results: the grids open, the adapter downloads byte for byte
        page.get_by_role("tab", name="Results").click()
        page.locator("#reload").click()
        grid = page.locator("#grids img").first
        expect(grid).to_be_visible(timeout=30_000)
        grid.click()
        page.screenshot(path=str(shots / "ui_results.png"))
        page.locator("#download").click()
        link = page.locator("#download-file a").first
        expect(link).to_be_visible(timeout=30_000)
        with page.expect_download() as download:
            link.click()
        saved = scratch / "downloaded.safetensors"
        download.value.save_as(saved)
        adapter = root / "output" / "demo" / "demo-000001.safetensors"
        chosen = page.locator("#adapter input").first.input_value()
        assert saved.read_bytes() == (root / "output" / "demo" / Path(chosen).name).read_bytes()
        assert adapter.is_file()
        browser.close()
    assert outside == []
