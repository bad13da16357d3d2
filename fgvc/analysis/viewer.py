"""The interactive viewer behind fgvc/demo.py: a photo in, the top-5 classes and every map out.

`Viewer.analyse(photo bytes)` runs the model's own analysis (fgvc/analysis/maps.py: CAM, Grad-CAM,
attention maps per stage via the AttentionRecorder, RA-CNN zoom boxes, DCN saliency and patches)
and draws each map over the photo with fgvc/analysis/drawing.py. `serve` puts it behind a small
page on the standard library's http.server, bound to 127.0.0.1 only. Any web page the user visits
can send requests there, so the server answers only its own page (Host and Origin checked, 403
otherwise), reads a body only with a valid Content-Length under the cap, drops clients that stall,
holds at most UPLOAD_SLOTS uploads and decodes at most DECODE_SLOTS photos of at most
MAX_PHOTO_PIXELS at once.
"""

from __future__ import annotations

import base64
import html
import io
import re
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image, UnidentifiedImageError

from fgvc.analysis.drawing import ImageView, draw_panel, save_figure, to_display
from fgvc.analysis.maps import compute_maps, model_family, sources_for
from fgvc.data.build import build_transform
from fgvc.data.records import to_rgb
from fgvc.engine.runs import RunInfo
from fgvc.errors import DataError
from fgvc.models.build import model_input

TOP_K = 5
HOST = "127.0.0.1"  # never reachable from another machine
MAX_UPLOAD_BYTES = 32 * 2**20  # a photo larger than this is refused with one sentence
MAX_PHOTO_PIXELS = 6000 * 6000  # a 36-megapixel camera's frame; Pillow's own limit (89 M) lets a 17 KB PNG cost 1.5 GB
DECODE_SLOTS = 2  # photos decoded at once; further uploads wait their turn (a decode holds up to ~0.5 GB)
REQUEST_TIMEOUT = 30.0  # seconds a client may stay silent mid-request before its connection and thread are freed
UPLOAD_SLOTS = 4  # uploads read and answered at once (each up to MAX_UPLOAD_BYTES); others wait, then get 503
UPLOAD_SECONDS = 120.0  # the whole body must arrive within this (32 MiB at 0.27 MiB/s): trickling bytes is no way in
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # what the page accepts; no other Pillow decoder runs
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
        self._decoding = threading.BoundedSemaphore(DECODE_SLOTS)
        self.needed_side = 2 * self.transform.eval_side  # decoded pixels beyond twice the resize target add nothing

    def analyse(self, photo: bytes, name: str = "upload") -> Analysis:
        with self._decoding:  # at most DECODE_SLOTS photos in memory at full size
            rgb = decode_photo(photo, name, self.needed_side)
            image, _, _ = self.transform(rgb, None, None)  # (3, H, W): resized and centre-cropped as in evaluation
            del rgb
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


def decode_photo(photo: bytes, name: str, needed_side: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an uploaded photo, as `load_rgb` reads a file (EXIF orientation, 16-bit
    scaled), refusing from its header alone a photo of more than MAX_PHOTO_PIXELS; a JPEG is decoded
    at 1/2, 1/4 or 1/8 scale (Pillow's draft) while its short side stays at least `needed_side`."""
    unreadable = DataError(f"the file '{name}' is not an image this viewer can read; upload a JPEG or PNG photo.")
    try:
        with Image.open(io.BytesIO(photo), formats=PHOTO_FORMATS) as img:
            width, height = img.size
            if width * height > MAX_PHOTO_PIXELS:
                raise DataError(f"the photo '{name}' has {width} x {height} pixels, more than this viewer decodes "
                                f"({MAX_PHOTO_PIXELS // 10**6} megapixels); the model reads {needed_side // 2} px a "
                                "side, so upload a smaller copy.")
            img.draft("RGB", (needed_side, needed_side))
            return np.asarray(to_rgb(img))
    except DataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        raise unreadable from None


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    save_figure(fig, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The page


PHOTO_CAPTIONS = {"classifier": "the photo as the network sees it (resized, centre-cropped)",
                  "racnn": "the photo as the network sees it, with RA-CNN's zoom boxes (zoom 1 orange, zoom 2 red)",
                  "dcn": "the photo as the network sees it, with the DCN's fine patches (dashed cyan)",
                  "cfvit": "the photo as the network sees it (full resolution: the fine pass's input)"}
CAPTIONS = {"cam": "class activation map of the top class", "gradcam": "Grad-CAM of the top class",
            "dcn_saliency": "DCN saliency (dashed cyan: the fine patches)",
            "stn_region": "spatial transformer's region",
            "cfvit_tokens": "CF-ViT: coarse tokens re-split at full resolution",
            "cfvit_class_attention": "CF-ViT: class attention that ranked the coarse tokens"}


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
    """(file name, bytes) of the form's photo field in a multipart/form-data body (RFC 7578), None if
    absent. The body is cut at its boundary lines in linear time; only each part's few header lines
    go through the e-mail parser (which, given a whole body, costs seconds per megabyte)."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        return None
    dash = b"--" + boundary.encode("latin-1", "replace")
    at = 0 if body.startswith(dash) else body.find(b"\r\n" + dash) + 2  # the preamble is dropped
    while at >= 2 or (at == 0 and body.startswith(dash)):  # `at`: the start of a boundary line
        if body.startswith(b"--", at + len(dash)):  # the closing boundary
            return None
        start = body.find(b"\r\n", at + len(dash)) + 2  # the part's first header line
        end = body.find(b"\r\n" + dash, start)
        stop = len(body) if end < 0 else end
        split = body.find(b"\r\n\r\n", start - 2, stop)  # - 2: a part without headers
        if start < 2 or split < 0:
            return None
        part = BytesHeaderParser(policy=HTTP).parsebytes(body[start:split + 4])
        if part.get_param("name", header="content-disposition") == FIELD:
            return part.get_filename() or "upload", body[split + 4:stop]
        at = -1 if end < 0 else end + 2
    return None


def make_handler(viewer: Viewer, title: str, timeout: float = REQUEST_TIMEOUT) -> type[BaseHTTPRequestHandler]:
    uploads = threading.BoundedSemaphore(UPLOAD_SLOTS)

    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            self.timeout = timeout  # StreamRequestHandler puts it on the socket: a silent client is dropped
            super().setup()

        def _send(self, status: HTTPStatus, page: str) -> None:
            data = page.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self, status: HTTPStatus, error: str) -> None:
            """Answer with `error` and close the connection (a body left unread must not become the next request)."""
            self.close_connection = True
            self._send(status, render_page(title, error=error))

        def _same_origin(self) -> bool:
            """The request names this server as its Host (no other site's name rebound to 127.0.0.1) and,
            if a browser sent it from a page, that page is this server's own (Origin)."""
            port = self.server.server_address[1]
            hosts = {f"{HOST}:{port}", f"localhost:{port}"}
            host, origins = self.headers.get_all("Host") or [], self.headers.get_all("Origin") or []
            return len(host) == 1 and host[0] in hosts and all(o in {f"http://{h}" for h in hosts} for o in origins)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not self._same_origin():
                self._refuse(HTTPStatus.FORBIDDEN, FOREIGN)
                return
            if self.path == "/favicon.ico":
                self.send_response(HTTPStatus.NO_CONTENT)
                self.end_headers()
                return
            if self.path.split("?")[0] != "/":
                self._send(HTTPStatus.NOT_FOUND, render_page(title, error=f"there is no page '{self.path}'; go to /."))
                return
            self._send(HTTPStatus.OK, render_page(title))

        def do_POST(self) -> None:  # noqa: N802
            if not self._same_origin():
                self._refuse(HTTPStatus.FORBIDDEN, FOREIGN)
                return
            lengths = self.headers.get_all("Content-Length") or []
            if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,12}", lengths[0].strip()):
                self._refuse(HTTPStatus.BAD_REQUEST, "the upload has no valid Content-Length; send the photo from "
                                                     "this page's form.")
                return
            length = int(lengths[0])
            if length > MAX_UPLOAD_BYTES:
                self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the upload has {length / 2**20:.0f} MiB; send a "
                                                                  f"photo under {MAX_UPLOAD_BYTES // 2**20} MiB.")
                return
            if not uploads.acquire(timeout=timeout):
                self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "the demo is busy with other uploads; try again.")
                return
            try:  # the slot is held until the answer is drawn: at most UPLOAD_SLOTS uploads in memory
                self._answer(length)
            finally:
                uploads.release()

        def _answer(self, length: int) -> None:
            body = self._read_body(length)
            if body is None:  # the client stalled or left: nobody reads an answer
                return
            upload = read_upload(self.headers.get("Content-Type", ""), body)
            del body
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

        def _read_body(self, length: int) -> bytes | None:
            """The body, or None (and the connection closed) if the client stalls, leaves, or trickles
            it slower than UPLOAD_SECONDS allows."""
            deadline, chunks, got = time.monotonic() + UPLOAD_SECONDS, [], 0
            try:
                while got < length and time.monotonic() < deadline:
                    chunk = self.rfile.read1(min(length - got, 2**20))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
            except OSError:  # silent past the request timeout, or gone
                pass
            if got < length:
                self.close_connection = True
                return None
            return b"".join(chunks)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            pass  # quiet: the terminal shows the address only

    return Handler


FOREIGN = ("this demo answers only its own page at 127.0.0.1 (another site's page or host name sent this "
           "request); open the address the demo printed.")


def make_server(viewer: Viewer, title: str, port: int, timeout: float = REQUEST_TIMEOUT) -> ThreadingHTTPServer:
    """The listening server (127.0.0.1 only); one daemon thread per connection."""
    server = ThreadingHTTPServer((HOST, port), make_handler(viewer, title, timeout))
    server.daemon_threads = True
    return server


def serve(viewer: Viewer, title: str, port: int, ready=None) -> None:
    """Serve until interrupted; `ready(url)` is called once the socket listens."""
    server = make_server(viewer, title, port)
    url = f"http://{HOST}:{server.server_address[1]}/"
    if ready is not None:
        ready(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
