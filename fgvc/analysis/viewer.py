"""The interactive viewer behind fgvc/demo.py: a photo in, the top-5 classes and every map out.

`Viewer.analyse(photo bytes)` runs the model's own analysis (fgvc/analysis/maps.py: CAM, Grad-CAM,
attention maps per stage via the AttentionRecorder, RA-CNN zoom boxes, DCN saliency and patches)
and draws each map over the photo with fgvc/analysis/drawing.py. `serve` puts it behind a small
page on the standard library's http.server, bound to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import html
import io
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from fgvc.analysis.drawing import ImageView, draw_panel, save_figure, to_display
from fgvc.analysis.maps import compute_maps, model_family, sources_for
from fgvc.data.build import build_transform
from fgvc.data.records import load_rgb
from fgvc.engine.runs import RunInfo
from fgvc.errors import DataError
from fgvc.models.build import model_input

TOP_K = 5
HOST = "127.0.0.1"  # never reachable from another machine
MAX_UPLOAD_BYTES = 32 * 2**20  # a photo larger than this is refused with one sentence
PANEL_INCHES = 3.0  # each picture on the page: 300 px at drawing.DPI
FIELD = "photo"  # the form's file field


@dataclass
class Analysis:
    top: list[tuple[str, float]]  # (class name, probability), most probable first
    pictures: dict[str, bytes]  # "photo" (with zoom boxes / patches) and one PNG per map, in source order
    family: str  # classifier | racnn | dcn
    skipped: dict[str, str] = field(default_factory=dict)  # map source -> why this model has no such map


class Viewer:
    """One loaded model; `analyse` may be called from several server threads (they take turns)."""

    def __init__(self, run: RunInfo) -> None:
        self.run = run
        self.transform = build_transform(run.cfg.data, False, run.mean, run.std, [], annotations=False)
        self.family = model_family(run.model)
        self.sources = sources_for(run.model)
        self._lock = threading.Lock()

    def analyse(self, photo: bytes, name: str = "upload") -> Analysis:
        try:
            rgb = load_rgb(io.BytesIO(photo))
        except DataError:
            raise DataError(f"the file '{name}' is not an image this viewer can read; "
                            "upload a JPEG or PNG photo.") from None
        image, _, _ = self.transform(rgb, None, None)  # (3, H, W): resized and centre-cropped as in evaluation
        with self._lock:  # one model; pyplot is not thread-safe either
            return self._analyse(image)

    def _analyse(self, image) -> Analysis:
        x = model_input(self.run.model, image[None])  # (1, 3, H, W) uint8 -> normalised float
        result = compute_maps(self.run.model, x)  # every map the model has (`self.sources`)
        probs = result.logits.float().softmax(-1)[0]
        top = probs.topk(min(TOP_K, len(self.run.class_names)))
        view = ImageView(image=to_display(image, self.run.mean, self.run.std), title="",
                         parts=np.zeros((0, 3), np.float32), box=np.full(4, np.nan, np.float32),
                         maps={k: v[0].numpy() for k, v in result.maps.items()},
                         zoom_boxes=[z[0].numpy() for z in result.zoom_boxes],
                         patches=None if result.patches is None else result.patches[0].numpy())
        pictures = {"photo": _png(draw_panel(view, None, PANEL_INCHES))}
        for map_name in result.maps:
            pictures[map_name] = _png(draw_panel(view, map_name, PANEL_INCHES))
        names = [self.run.class_names[i] for i in top.indices.tolist()]
        return Analysis(list(zip(names, top.values.tolist())), pictures, self.family, result.skipped)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    save_figure(fig, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The page


PHOTO_CAPTIONS = {"classifier": "the photo as the network sees it (resized, centre-cropped)",
                  "racnn": "the photo as the network sees it, with RA-CNN's zoom boxes (zoom 1 orange, zoom 2 red)",
                  "dcn": "the photo as the network sees it, with the DCN's fine patches (dashed cyan)"}
CAPTIONS = {"cam": "class activation map of the top class", "gradcam": "Grad-CAM of the top class",
            "dcn_saliency": "DCN saliency (dashed cyan: the fine patches)",
            "stn_region": "spatial transformer's region"}


def caption(name: str, family: str) -> str:
    if name == "photo":
        return PHOTO_CAPTIONS[family]
    if name.startswith("zoom"):
        return f"RA-CNN zoom {name[4:]} box"
    if "_stage" in name:
        kind, stage = name.split("_stage")
        return f"{kind} attention, stage {stage}"
    return CAPTIONS.get(name, name)


def render_page(title: str, analysis: Analysis | None = None, filename: str = "", error: str = "") -> str:
    esc = html.escape
    parts = [f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fgvc demo — {esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px}} figure{{display:inline-block;margin:.4em;vertical-align:top}}
figcaption{{font-size:85%;max-width:300px}} .error{{color:#b00}}</style></head><body>
<h1>fgvc demo: {esc(title)}</h1>
<form id="upload" method="post" action="/predict" enctype="multipart/form-data">
<input type="file" id="{FIELD}" name="{FIELD}" accept="image/*" onchange="this.form.submit()">
<button type="submit" id="classify">Classify</button></form>
<p>Choose or drop a photo; it stays on this computer.</p>"""]
    if error:
        parts.append(f'<p class="error" id="error">{esc(error)}</p>')
    if analysis is not None:
        best, best_p = analysis.top[0]
        rows = "".join(f'<tr><td>{i + 1}</td><td class="class">{esc(c)}</td><td class="prob">{p:.4f}</td></tr>'
                       for i, (c, p) in enumerate(analysis.top))
        parts.append(f'<h2>{esc(filename)}: <span id="top1">{esc(best)}</span> ({100 * best_p:.1f}%)</h2>'
                     f'<table id="top5"><tr><th>#</th><th>class</th><th>probability</th></tr>{rows}</table>')
        for name, png in analysis.pictures.items():
            data = base64.b64encode(png).decode()
            parts.append(f'<figure class="map" data-source="{esc(name)}"><img src="data:image/png;base64,{data}" '
                         f'alt="{esc(name)}"><figcaption>{esc(caption(name, analysis.family))}</figcaption></figure>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def read_upload(content_type: str, body: bytes) -> tuple[str, bytes] | None:
    """(file name, bytes) of the form's photo field in a multipart/form-data body, None if absent."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        return None
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == FIELD:
            data = part.get_payload(decode=True) or b""
            return part.get_filename() or "upload", data
    return None


def make_handler(viewer: Viewer, title: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: HTTPStatus, page: str) -> None:
            data = page.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/favicon.ico":
                self.send_response(HTTPStatus.NO_CONTENT)
                self.end_headers()
                return
            if self.path.split("?")[0] != "/":
                self._send(HTTPStatus.NOT_FOUND, render_page(title, error=f"there is no page '{self.path}'; go to /."))
                return
            self._send(HTTPStatus.OK, render_page(title))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD_BYTES:
                self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, render_page(
                    title, error=f"the upload has {length / 2**20:.0f} MiB; send a photo under "
                                 f"{MAX_UPLOAD_BYTES // 2**20} MiB."))
                return
            upload = read_upload(self.headers.get("Content-Type", ""), self.rfile.read(length))
            if upload is None or not upload[1]:
                self._send(HTTPStatus.BAD_REQUEST, render_page(title, error="no photo was sent; choose a file first."))
                return
            name, data = upload
            try:
                analysis = viewer.analyse(data, name)
            except DataError as err:
                self._send(HTTPStatus.BAD_REQUEST, render_page(title, error=str(err)))
                return
            self._send(HTTPStatus.OK, render_page(title, analysis, name))

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            pass  # quiet: the terminal shows the address only

    return Handler


def serve(viewer: Viewer, title: str, port: int, ready=None) -> None:
    """Serve until interrupted; `ready(url)` is called once the socket listens."""
    server = ThreadingHTTPServer((HOST, port), make_handler(viewer, title))
    server.daemon_threads = True
    url = f"http://{HOST}:{server.server_address[1]}/"
    if ready is not None:
        ready(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

