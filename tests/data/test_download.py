"""download(): resume, checksums, safe extraction and offline failure, against a local server."""
from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slsg.data import MVTecAD, MVTecLOCO
from slsg.data.download import (MVTEC_AD_CATEGORY_URLS, MVTEC_LOCO_URL, DownloadError, download,
                                safe_extract)


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bottle_archive() -> bytes:
    """A tiny, valid MVTec AD category archive (random bytes inside PNGs make it incompressible
    enough to span several read chunks)."""
    files = {f"bottle/train/good/{i:03d}.png": _png_bytes(i) for i in range(3)}
    files["bottle/test/good/000.png"] = _png_bytes(10)
    files["bottle/test/broken/000.png"] = _png_bytes(11)
    mask = io.BytesIO()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask, "PNG")
    files["bottle/ground_truth/broken/000_mask.png"] = mask.getvalue()
    files["bottle/license.txt"] = b"CC BY-NC-SA 4.0" + bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))
    return _tar_xz(files)


class _Server:
    """HTTP server on 127.0.0.1 serving one payload with optional Range support and faults."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.support_range = True
        self.cut_after: int | None = None  # close the connection after this many body bytes
        self.announce_size_on_416 = True  # RFC 9110 says SHOULD; some servers send no Content-Range
        self.web_page: bytes | None = None  # answer every request with this HTML page (status 200)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if server.web_page is not None:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(server.web_page)))
                    self.end_headers()
                    self.wfile.write(server.web_page)
                    return
                data, start = server.payload, 0
                range_header = self.headers.get("Range")
                if range_header and server.support_range:
                    start = int(range_header.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        if server.announce_size_on_416:
                            self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    body = body[: server.cut_after]
                self.wfile.write(body)
                server.sent = len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/bottle.tar.xz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(bottle_archive):
    srv = _Server(bottle_archive)
    yield srv
    srv.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verify_extract(server, bottle_archive, tmp_path):
    folder = download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert folder == tmp_path / "bottle"
    assert len(MVTecAD(folder, "train")) == 3 and len(MVTecAD(folder, "test")) == 2
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "bottle"]
    assert leftovers == []  # archive, .part and staging folder are all gone
    # A second call finds the data and does not touch the network.
    count = len(server.requests)
    assert download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False) == folder
    assert len(server.requests) == count


def test_resume_from_partial_file(server, bottle_archive, tmp_path):
    half = len(bottle_archive) // 2
    (tmp_path / "bottle.tar.xz.part").write_bytes(bottle_archive[:half])
    folder = download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False,
                      sha256=_sha(bottle_archive), keep_archive=True)
    assert server.requests[-1]["range"] == f"bytes={half}-"
    assert server.sent == len(bottle_archive) - half  # only the missing half travelled
    assert (tmp_path / "bottle.tar.xz").read_bytes() == bottle_archive
    assert not (tmp_path / "bottle.tar.xz.part").exists()
    assert (folder / "train" / "good" / "000.png").is_file()


def test_interrupted_download_then_resume(server, bottle_archive, tmp_path):
    server.cut_after = len(bottle_archive) // 3
    with pytest.raises(DownloadError, match="resume"):
        download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    part = tmp_path / "bottle.tar.xz.part"
    assert part.stat().st_size == len(bottle_archive) // 3
    assert not (tmp_path / "bottle").exists()
    server.cut_after = None
    download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert server.requests[-1]["range"] == f"bytes={len(bottle_archive) // 3}-"
    assert (tmp_path / "bottle" / "test" / "broken" / "000.png").is_file()


def test_server_without_range_support_restarts(server, bottle_archive, tmp_path):
    server.support_range = False
    (tmp_path / "bottle.tar.xz.part").write_bytes(b"stale bytes that must not be kept")
    download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert (tmp_path / "bottle" / "train" / "good").is_dir()


def test_restart_that_fails_early_keeps_the_longer_partial_download(server, bottle_archive, tmp_path):
    server.support_range = False  # answers 200 with the whole file, then the connection drops
    part = tmp_path / "bottle.tar.xz.part"
    part.write_bytes(bottle_archive[: 2 * len(bottle_archive) // 3])
    server.cut_after = len(bottle_archive) // 3
    with pytest.raises(DownloadError, match="resume"):
        download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert part.read_bytes() == bottle_archive[: 2 * len(bottle_archive) // 3]
    assert [p.name for p in tmp_path.iterdir()] == [part.name]
    server.cut_after = None
    download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert (tmp_path / "bottle" / "train" / "good").is_dir()


def test_a_web_page_instead_of_the_archive_keeps_the_partial_download(server, bottle_archive, tmp_path):
    part = tmp_path / "bottle.tar.xz.part"
    part.write_bytes(bottle_archive[: len(bottle_archive) // 2])
    server.web_page = b"<html><body>Too many requests</body></html>"
    with pytest.raises(DownloadError, match=r"web page \(text/html\).*partial download .* is kept"):
        download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert part.read_bytes() == bottle_archive[: len(bottle_archive) // 2]
    server.web_page = None
    download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert server.requests[-1]["range"] == f"bytes={len(bottle_archive) // 2}-"


def test_a_killed_extraction_is_not_taken_for_the_category(server, bottle_archive, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    staging = tmp_path / f".slsg-extract-{dead}-k1ll3d" / "bottle"  # what a killed extraction leaves behind
    (staging / "train" / "good").mkdir(parents=True)
    (staging / "test" / "good").mkdir(parents=True)
    running = tmp_path / f".slsg-extract-{os.getpid()}-busy"  # another download, still extracting
    running.mkdir()
    folder = download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert folder == tmp_path / "bottle" and len(MVTecAD(folder, "test")) == 2
    # the killed one's staging folder is gone, the running one's stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bottle", running.name])


def test_a_disk_error_while_extracting_keeps_the_verified_archive(server, bottle_archive, tmp_path, monkeypatch):
    import errno
    import tarfile

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extract", full_disk)
    with pytest.raises(DownloadError, match="No space left on device.*archive is kept"):
        download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert (tmp_path / "bottle.tar.xz").read_bytes() == bottle_archive
    monkeypatch.undo()
    count = len(server.requests)
    download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert len(server.requests) == count  # no second download


def test_complete_partial_file_gets_416(server, bottle_archive, tmp_path):
    (tmp_path / "bottle.tar.xz.part").write_bytes(bottle_archive)
    download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert (tmp_path / "bottle" / "train" / "good").is_dir()


def test_complete_partial_file_gets_416_without_its_size(server, bottle_archive, tmp_path):
    server.announce_size_on_416 = False
    (tmp_path / "bottle.tar.xz.part").write_bytes(bottle_archive)
    download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert (tmp_path / "bottle" / "train" / "good").is_dir()
    assert [r["range"] for r in server.requests] == [f"bytes={len(bottle_archive)}-"]  # kept: no second request


def test_unknown_partial_file_gets_416_without_its_size_and_starts_over(server, bottle_archive, tmp_path):
    server.announce_size_on_416 = False
    (tmp_path / "bottle.tar.xz.part").write_bytes(bottle_archive + b"junk")  # not the archive
    download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256=_sha(bottle_archive))
    assert (tmp_path / "bottle" / "train" / "good").is_dir()
    assert [r["range"] for r in server.requests] == [f"bytes={len(bottle_archive) + 4}-", None]


def test_wrong_checksum(server, tmp_path):
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []  # no archive, no .part, nothing extracted


def test_unreachable_url_fails_fast_with_instructions(tmp_path):
    with socket.socket() as probe:  # find a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download("mvtec-ad", "bottle", tmp_path, url=f"http://127.0.0.1:{port}/bottle.tar.xz", progress=False)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "offline" in message and "bottle.tar.xz" in message and "tar -xf" in message


def test_silent_server_times_out(tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/bottle.tar.xz"
        start = time.monotonic()
        with pytest.raises(DownloadError, match="offline"):
            download("mvtec-ad", "bottle", tmp_path, url=url, progress=False, timeout=0.5)
        assert time.monotonic() - start < 5


def test_file_url(bottle_archive, tmp_path):
    source = tmp_path / "mirror" / "bottle.tar.xz"
    source.parent.mkdir()
    source.write_bytes(bottle_archive)
    folder = download("mvtec-ad", "bottle", tmp_path / "data", url=source.as_uri(), progress=True,
                      sha256=_sha(bottle_archive))
    assert len(MVTecAD(folder, "train")) == 3


def test_incomplete_category_folder_is_reported_before_downloading(bottle_archive, tmp_path):
    # Extraction never overwrites the user's folder, so the download would be wasted.
    (tmp_path / "data" / "bottle" / "train" / "good").mkdir(parents=True)
    source = tmp_path / "mirror" / "bottle.tar.xz"
    source.parent.mkdir()
    source.write_bytes(bottle_archive)
    with pytest.raises(DownloadError, match="bottle exists but is not a complete mvtec-ad category; move it"):
        download("mvtec-ad", "bottle", tmp_path / "data", url=source.as_uri(), progress=False)
    assert not (tmp_path / "data" / "bottle.tar.xz").exists()  # nothing fetched


def test_root_that_is_a_file_is_reported(bottle_archive, tmp_path):
    source = tmp_path / "bottle.tar.xz"
    source.write_bytes(bottle_archive)
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(DownloadError, match="data is a file, not a folder"):
        download("mvtec-ad", "bottle", tmp_path / "data", url=source.as_uri(), progress=False)
    with pytest.raises(DownloadError, match="cannot create the folder .*data/sub"):
        download("mvtec-ad", "bottle", tmp_path / "data" / "sub", url=source.as_uri(), progress=False)
    assert (tmp_path / "data").read_text() == "not a folder"


def test_missing_file_url(tmp_path):
    with pytest.raises(DownloadError, match="cannot read"):
        download("mvtec-ad", "bottle", tmp_path, url=(tmp_path / "absent.tar.xz").as_uri(), progress=False)


def test_manually_placed_archive_is_used(bottle_archive, tmp_path):
    (tmp_path / "bottle.tar.xz").write_bytes(bottle_archive)
    # The URL is unreachable, so this only works without touching the network.
    folder = download("mvtec-ad", "bottle", tmp_path, url="http://127.0.0.1:9/bottle.tar.xz", progress=False)
    assert (folder / "train" / "good").is_dir()


def test_corrupt_archive_is_reported_and_removed(server, bottle_archive, tmp_path):
    broken = bytearray(bottle_archive)
    broken[len(broken) // 2] ^= 0xFF  # flips bits inside the xz stream: its CRC check must catch it
    server.payload = bytes(broken)
    with pytest.raises(DownloadError, match="corrupt"):
        download("mvtec-ad", "bottle", tmp_path, url=server.url, progress=False)  # no checksum given
    assert not (tmp_path / "bottle").exists() and not (tmp_path / "bottle.tar.xz").exists()


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil_abs.txt", "bottle/../../evil.txt"])
def test_path_traversal_is_refused(tmp_path, name):
    archive = tmp_path / "evil.tar.xz"
    archive.write_bytes(_tar_xz({"bottle/ok.txt": b"fine", name: b"pwned"}))
    target = tmp_path / "out"
    with pytest.raises(DownloadError, match="outside"):
        safe_extract(archive, target)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil_abs.txt").exists()


def test_links_are_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        link = tarfile.TarInfo("bottle/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    archive = tmp_path / "link.tar.xz"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(DownloadError, match="link"):
        safe_extract(archive, tmp_path / "out")


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        download("imagenet", "bottle", tmp_path)
    with pytest.raises(ValueError, match="category"):
        download("mvtec-ad", "bottel", tmp_path)
    with pytest.raises(ValueError, match="category"):
        download("mvtec-loco", "bottle", tmp_path)


def test_official_sources_are_recorded():
    assert len(MVTEC_AD_CATEGORY_URLS) == 15
    assert all(url.startswith("https://www.mydrive.ch/") and url.endswith(f"/{name}.tar.xz")
               for name, url in MVTEC_AD_CATEGORY_URLS.items())
    assert MVTEC_LOCO_URL.endswith("/mvtec_loco_anomaly_detection.tar.xz")


@pytest.mark.parametrize("prefix", ["", "mvtec_loco_anomaly_detection/"])
def test_loco_archive_with_or_without_top_folder(tmp_path, builders, prefix):
    tree = builders.build_loco(tmp_path / "src" / "pushpins")
    archive = tmp_path / "mvtec_loco_anomaly_detection.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(tree, arcname=f"{prefix}pushpins")
        info = tarfile.TarInfo(f"{prefix}license.txt")
        tar.addfile(info, io.BytesIO(b""))
    root = tmp_path / "loco"
    folder = download("mvtec-loco", "pushpins", root, url=archive.as_uri(), progress=False,
                      sha256=_sha(archive.read_bytes()))
    assert folder == root / prefix / "pushpins"
    assert len(MVTecLOCO(folder, "test")) == 5
    assert download("mvtec-loco", "pushpins", root, url="http://127.0.0.1:9/x.tar.xz", progress=False) == folder
