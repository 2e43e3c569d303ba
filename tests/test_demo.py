"""The Gradio demo: every endpoint through gradio_client, and one end-to-end run in headless Chromium."""

import os
import shutil
import socket

import pytest
from PIL import Image

from tests.helpers import encode, shape_image

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    from mmalign.demo import create_demo

    module, _, app = create_demo(tiny_run, max_labels=20, max_pixels=1_000_000, device="cpu")
    url = module.launch(app, "127.0.0.1", free_port(), share=False, block=False)
    yield url
    app.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False)


@pytest.fixture
def images(tmp_path):
    circle = tmp_path / "circle.png"
    circle.write_bytes(encode(shape_image("red", "circle"), "PNG"))
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    huge = tmp_path / "huge.png"
    Image.new("L", (2000, 1000)).save(huge)
    return {"circle": circle, "text": text, "huge": huge}


def test_demo_binds_to_loopback(server):
    assert server.startswith("http://127.0.0.1:")


def test_classify_ranks_labels(client, images):
    ranked, seen = client.predict(
        gradio_client.handle_file(str(images["circle"])),
        "red circle, blue square\ngreen cross",
        "",
        api_name="/classify",
    )
    labels = [item["label"] for item in ranked["confidences"]]
    assert sorted(labels) == ["blue square", "green cross", "red circle"]
    assert sum(item["confidence"] for item in ranked["confidences"]) == pytest.approx(1.0, abs=1e-4)
    assert seen


def test_classify_with_templates(client, images):
    ranked, _ = client.predict(
        gradio_client.handle_file(str(images["circle"])),
        "red circle, blue square",
        "a {}\na picture of a {}",
        api_name="/classify",
    )
    assert len(ranked["confidences"]) == 2


@pytest.mark.parametrize(
    ("image", "labels", "templates", "message"),
    [
        ("text", "a, b", "", "is not an image file"),
        ("huge", "a, b", "", "too many pixels"),
        ("circle", " , \n ", "", "No labels"),
        ("circle", ", ".join(f"label {n}" for n in range(21)), "", "the limit is 20"),
        ("circle", "a, b", "no placeholder", "exactly one {}"),
        (None, "a, b", "", "No image"),
    ],
)
def test_classify_bad_input_gets_a_message(client, images, image, labels, templates, message):
    upload = gradio_client.handle_file(str(images[image])) if image else None
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(upload, labels, templates, api_name="/classify")
    # the server is still up
    assert client.predict(gradio_client.handle_file(str(images["circle"])), "a, b", "", api_name="/classify")


def test_text_to_image_returns_gallery(client):
    gallery = client.predict("a red circle", 5, api_name="/text_to_image")
    assert len(gallery) == 5
    assert all(item["image"] for item in gallery)
    scores = [float(item["caption"].split()[0]) for item in gallery]
    assert scores == sorted(scores, reverse=True)


def test_text_to_image_empty_query(client):
    with pytest.raises(gradio_client.exceptions.AppError, match="query is empty"):
        client.predict("   ", 5, api_name="/text_to_image")


def test_image_to_text_returns_captions(client, images):
    table, _ = client.predict(gradio_client.handle_file(str(images["circle"])), 3, api_name="/image_to_text")
    assert table["headers"] == ["rank", "score", "caption", "image key"]
    assert [row[0] for row in table["data"]] == [1, 2, 3]


def test_missing_index_is_explained(tiny_run, tmp_path, images):
    from mmalign.demo import create_demo

    model_only = tmp_path / "model"
    model_only.mkdir()
    for path in tiny_run.iterdir():
        if path.is_file():
            shutil.copy(path, model_only / path.name)
    module, _, app = create_demo(model_only, device="cpu")
    url = module.launch(app, "127.0.0.1", free_port(), share=False, block=False)
    try:
        client = gradio_client.Client(url, verbose=False)
        with pytest.raises(gradio_client.exceptions.AppError, match="No index is loaded"):
            client.predict("a red circle", 5, api_name="/text_to_image")
        with pytest.raises(gradio_client.exceptions.AppError, match="No index is loaded"):
            client.predict(gradio_client.handle_file(str(images["circle"])), 3, api_name="/image_to_text")
    finally:
        app.close()


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
def test_browser_classifies_an_upload(server, images, tmp_path):
    executable = chromium_path()
    if executable is None:
        if os.environ.get("MMALIGN_REQUIRE_BROWSER"):
            pytest.fail("MMALIGN_REQUIRE_BROWSER is set but no chromium executable was found")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server, wait_until="domcontentloaded")
            page.locator("#classify-image input[type=file]").set_input_files(str(images["circle"]))
            page.locator("#labels textarea").fill("red circle, blue square, green cross")
            page.locator("#classify-button").click()
            ranked = page.locator("#ranked-labels")
            ranked.get_by_text("red circle").first.wait_for(timeout=30_000)
            text = ranked.inner_text()
            screenshot = tmp_path / "demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    for label in ("red circle", "blue square", "green cross"):
        assert label in text
    assert "%" in text
    assert screenshot.stat().st_size > 10_000
    artifacts = os.environ.get("MMALIGN_ARTIFACTS")
    if artifacts:
        shutil.copy(screenshot, os.path.join(artifacts, "demo-classify.png"))
