"""The interactive viewer (issue 18): every map source of every architecture drawn over the photo,
the upload parser, and the page in a real browser (Debian's headless Chromium, driven by selenium)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_DATA

from fgvc.models.build import model_input
from fgvc.analysis.maps import compute_maps
from fgvc.analysis.viewer import FIELD, Viewer, read_upload
from fgvc.config import load_recipe
from fgvc.data.build import build_transform
from fgvc.data.records import load_rgb
from fgvc.engine.runs import RunInfo, load_run
from fgvc.models.build import build_model

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def multipart(name: str, data: bytes, boundary: str = "fgvc-test-boundary") -> tuple[str, bytes]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{FIELD}\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def test_upload_parser_returns_the_exact_bytes():
    data = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n\r\n" + b"\x00\xff" * 10
    content_type, body = multipart("bird.jpg", data)
    assert read_upload(content_type, body) == ("bird.jpg", data)
    assert read_upload("text/plain", b"photo=1") is None


def cbam_run(synth_root) -> RunInfo:
    """An untrained CBAM classifier: attention maps per stage need no training to be drawn."""
    cfg = load_recipe(["recipe=synth_cbam", f"data.root={synth_root}", *TINY_DATA, "model.attention.stages=[2,3]"])
    model = build_model(cfg.model, 4, cfg.data.image_size).eval()
    return RunInfo(Path("."), cfg, model, [f"class {i}" for i in range(4)], [], (0.5,) * 3, (0.5,) * 3,
                   cfg.data.image_size)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cbam", "racnn", "dcn"])
def test_viewer_draws_every_map_source_of_the_model(arch, tiny_arch_runs, synth_root):
    run = cbam_run(synth_root) if arch == "cbam" else load_run(tiny_arch_runs[arch])
    photo = sorted(synth_root.rglob("*.jpg"))[0]
    analysis = Viewer(run).analyse(photo.read_bytes(), photo.name)
    x = build_transform(run.cfg.data, False, run.mean, run.std, [], annotations=False)(load_rgb(photo), None, None)[0]
    expected = compute_maps(run.model, model_input(run.model, x[None]))  # the analysis code's own maps and prediction
    assert list(analysis.pictures) == ["photo", *expected.maps]
    own = {"cbam": {"cbam_stage2", "cbam_stage3"}, "racnn": {"zoom1"}, "dcn": {"dcn_saliency"}}[arch]
    assert own <= set(expected.maps)
    assert {"cam", "gradcam"} <= set(expected.maps)
    assert all(png.startswith(PNG_MAGIC) for png in analysis.pictures.values())
    probs = expected.logits.softmax(-1)[0]
    assert [c for c, _ in analysis.top] == [run.class_names[i] for i in probs.topk(4).indices.tolist()]
    assert sum(p for _, p in analysis.top) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def demo_server(tiny_run):
    """fgvc/demo.py on the tiny run, on a free port; stopped after the module."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "fgvc" / "demo.py"), str(tiny_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()  # "fgvc demo of ... at http://127.0.0.1:PORT/"
        assert "http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        yield line.split(" at ")[-1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_demo_refuses_a_file_that_is_not_an_image(demo_server):
    content_type, body = multipart("notes.txt", b"not a photo")
    request = urllib.request.Request(demo_server + "predict", data=body, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400 and "is not an image" in err.value.read().decode()


@pytest.mark.slow
def test_browser_uploads_a_photo_and_reads_the_prediction(demo_server, tiny_run, synth_root, tmp_path, monkeypatch):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = sorted(synth_root.rglob("*.jpg"))[0]
    run = load_run(tiny_run)
    x = build_transform(run.cfg.data, False, run.mean, run.std, [])(load_rgb(photo), None, None)[0]
    with torch.no_grad():
        expected = run.class_names[int(run.model(model_input(run.model, x[None])).argmax())]
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not look for drivers online
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(120)
        driver.get(demo_server)
        driver.find_element(By.ID, FIELD).send_keys(str(photo))  # the page submits on change
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.ID, "top1"))
        assert driver.find_element(By.ID, "top1").text == expected
        rows = driver.find_elements(By.CSS_SELECTOR, "#top5 td.class")
        assert len(rows) == len(run.class_names) and rows[0].text == expected
        sources = [f.get_attribute("data-source") for f in driver.find_elements(By.CSS_SELECTOR, "figure.map")]
        assert sources == ["photo", "cam", "gradcam"]
        assert driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    finally:
        driver.quit()
