"""Folders, recipes and pages from elsewhere: nothing is written outside the folder fgvc is given
(no link followed), no environment value reaches a saved recipe or an export, the demo answers only
its own page and cannot be exhausted by uploads, an unfinished run is not exported, and every
remaining bad input ends in one sentence with its exit code."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, TINY_DATA, accelerate_launch, run_script
from PIL import Image
from test_safety import copy_run, one_sentence, train, tree

from fgvc.config import load_recipe
from fgvc.errors import DataError, UserError
from fgvc.safe_io import file_mode, folder_mode

SECRET = "hf_fgvc_test_secret_4242"
ATTACKER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIattacker attacker@elsewhere"


def victim(tmp_path: Path) -> Path:
    """A file outside the run folder that a link inside it points to: it must stay byte-identical."""
    target = tmp_path / "home" / ".ssh" / "authorized_keys"
    target.parent.mkdir(parents=True)
    target.write_text("ssh-ed25519 AAAAowner owner@here\n")
    return target


# 1. Nothing is written through a link in a received folder.

@pytest.mark.parametrize("link", ["report.html", "report", "eval.json"])
def test_evaluate_refuses_a_link_in_the_run_folder(link, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "received")
    target = victim(tmp_path)
    before = target.read_bytes()
    (run / link).symlink_to(target.parent if link == "report" else target)
    proc = run_script("evaluate.py", str(run))
    one_sentence(proc, 3, "is a symbolic link")
    assert target.read_bytes() == before and sorted(p.name for p in target.parent.iterdir()) == ["authorized_keys"]


def test_a_class_name_with_a_newline_is_refused(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "received")
    meta = json.loads((run / "model.json").read_text())
    meta["class_names"][1] = f"bird\n{ATTACKER_KEY}\n"
    (run / "model.json").write_text(json.dumps(meta))
    before = tree(run)
    one_sentence(run_script("evaluate.py", str(run)), 3, "class name 1 holds the control character '\\n'")
    assert tree(run) == before


def test_localize_refuses_a_linked_output_folder(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "received")
    target = victim(tmp_path)
    (run / "localization").symlink_to(target.parent)
    one_sentence(run_script("localize.py", str(run), "--num-images", "2"), 3, "is a symbolic link")
    assert sorted(p.name for p in target.parent.iterdir()) == ["authorized_keys"]


def test_a_resumed_run_never_appends_or_locks_through_a_link(tiny_run, synth_root, tmp_path):
    run = copy_run(tiny_run, tmp_path / "received")
    (run / "metrics.json").unlink()
    target = victim(tmp_path)
    before = target.read_bytes()
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(target)  # the lock is truncated and rewritten by its holder
    proc = train(run, synth_root, "train.epochs=3", "train.resume=auto")
    one_sentence(proc, 3, ".lock' is a symbolic link")
    assert target.read_bytes() == before


# 2. No environment value is written anywhere; interpolation errors are one sentence.

def test_an_environment_resolver_is_refused_and_nothing_is_written(synth_root, tmp_path):
    recipe = tmp_path / "leaky.yaml"
    recipe.write_text("base: synth_baseline\ndata:\n  root: /tmp/x_${oc.env:HF_TOKEN}\n")
    out = tmp_path / "run"
    proc = run_script("train.py", f"recipe={recipe}", f"output_dir={out}", "train.epochs=1", *TINY_DATA,
                      env={"HF_TOKEN": SECRET})
    one_sentence(proc, 2, "calls the resolver '${oc.env:...}'")
    assert SECRET not in proc.stdout + proc.stderr and not out.exists()
    proc = run_script("train.py", "data.root=${oc.env:HF_TOKEN}", f"output_dir={out}", env={"HF_TOKEN": SECRET})
    one_sentence(proc, 2, "calls the resolver")
    assert not out.exists()


@pytest.mark.parametrize("layer, needle", [
    ("train: {lr: '${data.name}'}", "could not be converted to Float"),  # type mismatch
    ("train: {lr: '${train.lr}'}", "Recursive interpolation"),  # self-reference
    ("data: {root: '${data.nowhere}'}", "'data.nowhere' not found"),  # unknown key
])
def test_interpolation_errors_are_one_sentence(layer, needle, tmp_path):
    (tmp_path / "r.yaml").write_text(layer + "\n")
    with pytest.raises(UserError, match=re.escape(needle)):
        load_recipe([f"recipe={tmp_path / 'r.yaml'}"])
    one_sentence(run_script("train.py", f"recipe={tmp_path / 'r.yaml'}", timeout=120), 2, needle)


def test_recipe_names_are_names_in_recipes_not_paths(tmp_path):
    (tmp_path / "based.yaml").write_text("base: ../../../../etc/passwd_like\n")
    (tmp_path / "named.yaml").write_text("recipe: ../../home/someone\n")
    for args, needle in ((["recipe=../tests/anything"], "recipe is '../tests/anything'"),
                         ([f"recipe={tmp_path / 'based.yaml'}"], "the 'base:' of"),
                         ([f"recipe={tmp_path / 'named.yaml'}"], "recipe key 'recipe' is '../../home/someone'")):
        with pytest.raises(UserError, match=re.escape(needle)):
            load_recipe(args)
    assert load_recipe(["recipe=synth_baseline"]).output_dir == "runs/synth_baseline"


# 4. An unfinished run is not exported; exports are plain folders with normal modes.

def test_export_refuses_an_unfinished_run(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "killed")
    (run / "metrics.json").unlink()
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    proc = run_script("export.py", str(run), str(tmp_path / "out"))
    sentence = one_sentence(proc, 2, "has not finished (epoch 1 of 2 done")
    assert "train.resume=auto" in sentence and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_export_refuses_a_linked_or_dangling_folder_and_writes_normal_modes(tiny_run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("linked", "dangling"):
        one_sentence(run_script("export.py", str(tiny_run), str(tmp_path / name)), 3, "is a symbolic link")
    assert not list(elsewhere.iterdir()) and not (tmp_path / "nowhere").exists()
    proc = run_script("export.py", str(tiny_run), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == folder_mode()
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: file_mode() for p in out.iterdir()}
    assert (tiny_run / "recipe.yaml").stat().st_mode & 0o777 == file_mode()  # a run's own files too
    assert (tiny_run / "model.safetensors").stat().st_mode & 0o777 == file_mode()


def test_model_card_states_only_what_the_run_measured(tiny_run, tmp_path):
    from fgvc.analysis.share import export_run

    run = copy_run(tiny_run, tmp_path / "no_test")
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["test"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    card = (export_run(run, tmp_path / "card") / "README.md").read_text()
    assert "the test split was not evaluated" in card and "evaluated once" not in card and "| test |" not in card


# 5. The remaining tracebacks are one sentence.

@pytest.mark.parametrize("line", ["this is not json", "", '{"epoch": "2"}', "[1, 2]"])
def test_a_damaged_metrics_log_is_one_sentence(line, tiny_run, tmp_path):
    from fgvc.engine.runs import read_log

    run = copy_run(tiny_run, tmp_path / "edited")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{run / 'metrics.jsonl'}:2 is not a metrics line")):
        read_log(run / "metrics.jsonl")


def test_evaluate_and_resume_name_the_damaged_metrics_line(tiny_run, synth_root, tmp_path):
    run = copy_run(tiny_run, tmp_path / "edited")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    one_sentence(run_script("evaluate.py", str(run)), 3, "metrics.jsonl:3 is not a metrics line")
    (run / "metrics.json").unlink()
    one_sentence(train(run, synth_root, "train.epochs=3", "train.resume=auto"), 3, "metrics.jsonl:3 is not")


def test_a_foreign_optimizer_file_is_one_sentence(tiny_run, synth_root, tmp_path):
    run = copy_run(tiny_run, tmp_path / "foreign")
    (run / "metrics.json").unlink()
    last = sorted((run / "checkpoints").iterdir())[-1]
    (last / "optimizer.bin").write_bytes(pickle.dumps(Path("/etc/passwd")))  # a pickle weights_only refuses
    one_sentence(train(run, synth_root, "train.epochs=3", "train.resume=auto"), 3, f"checkpoint '{last}' is damaged")


def test_short_class_names_are_one_sentence(tiny_run, synth_root, tmp_path):
    run = copy_run(tiny_run, tmp_path / "short")
    meta = json.loads((run / "model.json").read_text())
    meta["class_names"] = meta["class_names"][:2]
    (run / "model.json").write_text(json.dumps(meta))
    image = sorted(synth_root.rglob("*.jpg"))[0]
    one_sentence(run_script("predict.py", str(run), str(image)), 3, "names 2 classes where the model has 4")


def test_bad_port_and_top_are_one_sentence(tiny_run, synth_root):
    one_sentence(run_script("demo.py", str(tiny_run), "--port", "99999"), 2, "--port is 99999")
    image = sorted(synth_root.rglob("*.jpg"))[0]
    one_sentence(run_script("predict.py", str(tiny_run), str(image), "--top", "-1"), 2, "--top is -1")


@pytest.mark.slow
def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(synth_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "fgvc" / "train.py"), "recipe=synth_baseline", f"output_dir={out}",
           f"data.root={synth_root}", *TINY_DATA, "train.epochs=200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "checkpoints").glob("epoch_*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    sentence = one_sentence(result, 130, "interrupted (Ctrl-C)")
    assert "its last checkpoint is" in sentence and "epoch_" in sentence
    assert f"recipe={out / 'recipe.yaml'} train.resume=auto" in sentence


# 6. Papercuts.

def test_predict_skips_a_fifo_in_a_folder_and_names_a_fifo_given(tiny_run, synth_root, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted(synth_root.rglob("*.jpg"))[0]
    (folder / "bird.jpg").write_bytes(good.read_bytes())
    os.mkfifo(folder / "pipe.jpg")
    proc = run_script("predict.py", str(tiny_run), str(folder), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["image"] for r in json.loads(proc.stdout)] == [str(folder / "bird.jpg")]
    proc = run_script("predict.py", str(tiny_run), str(folder / "pipe.jpg"), str(good), "--json", timeout=120)
    results = json.loads(proc.stdout)
    assert proc.returncode == 1 and "not a regular file" in results[0]["error"] and len(results[1]["top"]) == 4


@pytest.mark.slow
def test_a_bad_key_on_two_processes_is_said_once(tmp_path):
    proc = accelerate_launch("train.py", "train.lr_rate=0.1", f"output_dir={tmp_path / 'run'}", launcher="fgvc.launch")
    one_sentence(proc, 2, "did you mean 'train.lr'?")


# 3. The demo answers only its own page and bounds what an upload costs.

def tiny_viewer(synth_root):
    from fgvc.analysis.viewer import Viewer
    from fgvc.engine.runs import RunInfo
    from fgvc.models.build import build_model

    cfg = load_recipe(["recipe=synth_baseline", f"data.root={synth_root}", *TINY_DATA])
    model = build_model(cfg.model, 4, cfg.data.image_size).eval()
    return Viewer(RunInfo(Path("."), cfg, model, [f"class {i}" for i in range(4)], [], (0.5,) * 3, (0.5,) * 3,
                          cfg.data.image_size))


STALL_TIMEOUT = 3.0  # the test server's request timeout, seconds


@pytest.fixture(scope="module")
def local_server(synth_root):
    """The demo's server in this process with a short request timeout; (port, server)."""
    from fgvc.analysis.viewer import make_server

    server = make_server(tiny_viewer(synth_root), "tiny", 0, timeout=STALL_TIMEOUT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], server
    server.shutdown()
    server.server_close()


def raw_request(port: int, request: bytes, body: bytes = b"") -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"</html>" in data:
                break
    head, _, page = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), page.decode(errors="replace")


def post(port: int, headers: dict[str, str], body: bytes = b"") -> tuple[int, str]:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return raw_request(port, f"POST /predict HTTP/1.1\r\n{lines}\r\n".encode(), body)


def test_demo_answers_only_its_own_page(local_server):
    port, _ = local_server
    own = f"127.0.0.1:{port}"
    assert raw_request(port, f"GET / HTTP/1.1\r\nHost: {own}\r\n\r\n".encode())[0] == 200
    assert raw_request(port, f"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode())[0] == 403  # rebinding
    status, page = post(port, {"Host": own, "Origin": "https://evil.example", "Content-Length": "0"})
    assert status == 403 and "answers only its own page" in page
    assert post(port, {"Host": own, "Origin": "null", "Content-Length": "0"})[0] == 403
    assert post(port, {"Host": own, "Origin": f"http://{own}", "Content-Length": "0"})[0] == 400  # own page: no photo


@pytest.mark.parametrize("length, status", [(None, 400), ("-1", 400), ("abc", 400), ("1e3", 400),
                                            (str(33 * 2**20), 413)])
def test_demo_requires_a_valid_length_within_the_cap(local_server, length, status):
    port, _ = local_server
    headers = {"Host": f"127.0.0.1:{port}", "Content-Type": "multipart/form-data; boundary=x"}
    if length is not None:
        headers["Content-Length"] = length
    code, page = post(port, headers, b"--x\r\n" * 100)
    assert code == status and ("Content-Length" in page or "MiB" in page)


def test_demo_frees_the_threads_of_stalled_clients(local_server):
    port, _ = local_server
    before = threading.active_count()
    stalled = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:  # half-sent headers
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1")
        else:  # headers sent, body stalled
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 1000\r\n\r\nab".encode())
        stalled.append(s)
    time.sleep(0.3)
    assert threading.active_count() >= before + 10  # one thread per connection
    deadline = time.monotonic() + 5 * STALL_TIMEOUT
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= before  # the timeout dropped every stalled client
    for s in stalled:
        s.close()


def test_upload_parsing_is_linear():
    from fgvc.analysis.viewer import read_upload

    data = os.urandom(2**20) + b"\n" * 8 * 2**20  # short lines cost the e-mail parser most
    body = (b"--b\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"x.png\"\r\n\r\n" + data
            + b"\r\n--b--\r\n")
    start = time.perf_counter()
    assert read_upload("multipart/form-data; boundary=b", body) == ("x.png", data)
    assert time.perf_counter() - start < 2  # the e-mail parser took about 7 s for these 9 MiB


def test_a_large_jpeg_is_decoded_at_a_reduced_scale():
    from fgvc.analysis.viewer import decode_photo

    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(buffer, "JPEG")
    rgb = decode_photo(buffer.getvalue(), "big.jpg", needed_side=80)
    assert rgb.shape == (375, 500, 3) and abs(int(rgb[100, 100, 0]) - 200) < 8  # 1/8 scale in the DCT


def huge_png(side: int) -> bytes:
    """A side x side 1-bit black PNG: a few kilobytes that decode to side^2 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = compressor.compress(row * side) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def memory_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_demo_memory_stays_bounded_under_parallel_huge_uploads(tiny_run, synth_root):
    from test_demo import multipart

    png = huge_png(12000)
    assert len(png) < 64 * 1024
    proc = subprocess.Popen([sys.executable, str(ROOT / "fgvc" / "demo.py"), str(tiny_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = proc.stdout.readline().split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url

        def upload(name: str, data: bytes) -> tuple[int, str]:
            content_type, body = multipart(name, data)
            request = urllib.request.Request(url + "predict", data=body, headers={"Content-Type": content_type})
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as err:
                return err.code, err.read().decode()

        assert upload("bird.jpg", sorted(synth_root.rglob("*.jpg"))[0].read_bytes())[0] == 200  # warm
        idle = memory_kib(proc.pid, "VmRSS")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: upload(f"huge{i}.png", png), range(8)))
        peak = memory_kib(proc.pid, "VmHWM")
        assert all(code == 400 and "12000 x 12000 pixels" in page for code, page in answers), answers[0]
        assert (peak - idle) * 1024 < 2**30, f"grew by {(peak - idle) / 2**20:.2f} GiB"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
