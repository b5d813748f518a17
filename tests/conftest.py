"""Shared fixtures. The suite needs neither ../shared nor a GPU: pairs are synthetic, and the
released weights are served by a local HTTP server (:class:`Server`) where a test needs them."""
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which is chosen when the
# kernels are defined: set it before anything imports crossfuse_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Dynamo records torch's functions when it is first imported; imported later, under a test that
# replaces torch.empty_like (poisoned_allocations), it would refuse the real one ever after. After
# TRITON_INTERPRET: it imports Triton, which reads that variable.
import torch._dynamo  # noqa: E402, F401

from crossfuse_fast import CrossFuse
from crossfuse_fast.synthetic import randomize_batch_norms

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def model() -> CrossFuse:
    """A CrossFuse with seeded random weights, in eval mode."""
    torch.manual_seed(1234)
    return randomize_batch_norms(CrossFuse()).eval()


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fresh floating-point buffers start as NaN, so any element a kernel fails to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty_like(*args, **kwargs):
        out = empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("dist", "no") != "no" or "PYTEST_XDIST_WORKER" in os.environ:
        # The suite has no benchmarks (bench/ has): pytest-benchmark need not warn that it
        # turns them off under xdist.
        config.option.benchmark_disable = True
    # Torch threads share the machine's cores with pytest-xdist's workers (-n): more threads only
    # contend, and most of the suite is Triton's single-threaded interpreter.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Synthetic pairs and one-step checkpoints of both stages, made through the command line."""
    from crossfuse_fast.cli import main
    root = tmp_path_factory.mktemp("cli")
    assert main(["synthetic", "--out", str(root / "pairs"), "--count", "2", "--height", "40", "--width", "48"]) == 0
    for modality in ("ir", "vis"):
        assert main(["train-autoencoder", "--synthetic", "2", "--synthetic-modality", modality, "--size", "32",
                     "--epochs", "1", "--max-steps", "1", "--out", str(root / modality)]) == 0
    assert main(["train-fusion", "--ir", str(root / "pairs" / "ir"), "--vis", str(root / "pairs" / "vis"),
                 "--size", "64", "--batch-size", "2", "--epochs", "1", "--max-steps", "1",
                 "--ir-autoencoder", str(root / "ir" / "autoencoder_epoch1.model"),
                 "--vis-autoencoder", str(root / "vis" / "autoencoder_epoch1.model"),
                 "--out", str(root / "fusion")]) == 0
    return root


def weights(root: Path) -> list[str]:
    return ["--ir-autoencoder", str(root / "ir" / "autoencoder_epoch1.model"),
            "--vis-autoencoder", str(root / "vis" / "autoencoder_epoch1.model"),
            "--fusion", str(root / "fusion" / "fusion_epoch1.model")]


def _count_calls(monkeypatch, owner, name: str) -> list:
    """One entry per call of ``owner.name``, which still runs."""
    calls = []
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    return calls


@pytest.fixture
def fast_fusion_calls(monkeypatch) -> list:
    """One entry per ``FastFusionNet`` forward: parity alone would also pass if a ``backend="fast"``
    path ran the reference, so tests check the fast network really ran."""
    from crossfuse_fast.fast import FastFusionNet
    return _count_calls(monkeypatch, FastFusionNet, "forward")


@pytest.fixture
def fast_dense_block_calls(monkeypatch) -> list:
    """One entry per dense block run by ``FastAutoEncoder`` (the encoders of ``backend="fast"``)."""
    from crossfuse_fast.fast import encoder
    return _count_calls(monkeypatch, encoder, "dense_block")


def blob_id(data: bytes) -> str:
    """The git blob id of ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Server:
    """Serves ``files`` (``{url path: bytes}``) on 127.0.0.1; ``truncate`` cuts every body in half
    after announcing its whole length; ``requests`` lists the paths asked for."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.truncate, self.requests = files, False, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if server.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
