"""The Gradio app driven through gradio_client: generate, grid, errors, concurrency, train, vision."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image
from studio_helpers import settings
from ui_server import start_app

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is a test dependency")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("studio-ui")
    service, app, url = start_app(data)
    yield service, url, data
    app.close()


def gen_args(seed=1, adapter="", strength=1.0, steps=3, prompt="a red circle"):
    # base, prompt, negative, seed, steps, guidance, size, precision, fuse, blocks, 3 x (name, strength, schedule)
    return [
        "tiny-sd",
        prompt,
        "",
        seed,
        steps,
        5.0,
        32,
        "fp",
        False,
        "",
        adapter,
        strength,
        "",
        "",
        1,
        "",
        "",
        1,
        "",
    ]


def pixels(path_or_image):
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def test_generate_keeps_png_metadata(server):
    service, url, _ = server
    path, params = Client(url, verbose=False).predict(*gen_args(adapter="example-attn"), api_name="/generate")
    assert path.endswith(".png")
    img = Image.open(path)
    assert img.info["parameters"] == params and "<lora:example-attn:1>" in params
    solo = service.generate(settings(adapters=["example-attn:1"])).image
    assert np.abs(pixels(img) - pixels(solo)).max() == 0


def test_grid_endpoint(server):
    _, url, _ = server
    out = Client(url, verbose=False).predict(
        "strength", "0.5, 1", "seed", "1, 2", True, False, *gen_args(adapter="example-attn"), api_name="/grid"
    )
    grid_path, files, table = out[0], out[1], out[2]
    assert Image.open(grid_path).info["parameters"].startswith("a red circle")
    assert sorted(p.rsplit("/", 1)[1] for p in files) == ["grid.json", "grid.png"]
    assert len(table["data"]) == 6 and table["data"][0][0] == "baseline (no adapter)"


def test_errors_are_messages_and_app_survives(server):
    _, url, data = server
    client = Client(url, verbose=False)
    bad = data / "adapters" / "broken.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(AppError) as err:
        client.predict(str(bad), "", api_name="/load_adapter")
    message = str(err.value)
    assert "Traceback" not in message and "broken.safetensors" in message
    assert "not a safetensors file" in message or "cannot load" in message
    with pytest.raises(AppError, match="outside the configured folders"):
        client.predict("/etc/passwd", "", api_name="/load_adapter")
    with pytest.raises(AppError, match="outside the configured folders"):
        client.predict(
            str(data / "adapters" / ".." / ".." / "secret.safetensors"), "", api_name="/load_adapter"
        )
    upload = data / "upload.safetensors"
    upload.write_bytes(b"junk")
    with pytest.raises(AppError):
        client.predict(handle_file(str(upload)), "", api_name="/upload_adapter")
    assert not (data / "adapters" / "uploads" / "upload.safetensors").exists()
    with pytest.raises(AppError, match="ghost"):
        client.predict(*gen_args(adapter="ghost"), api_name="/generate")
    with pytest.raises(AppError, match="bad strength schedule"):
        args = gen_args(adapter="example-attn")
        args[12] = "whenever"
        client.predict(*args, api_name="/generate")
    path, _ = client.predict(*gen_args(), api_name="/generate")  # still alive
    assert Image.open(path).size == (32, 32)


def test_eight_concurrent_clients_never_mix(server):
    service, url, _ = server
    requests = [(i + 10, ["", "example-attn", "example-conv"][i % 3], [1.0, 0.5][i % 2]) for i in range(8)]
    solo = [
        service.generate(settings(seed=s, adapters=[f"{a}:{w}"] if a else [])).image for s, a, w in requests
    ]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def user(i: int) -> None:
        try:
            client = Client(url, verbose=False)
            barrier.wait()
            seed, adapter, strength = requests[i]
            results[i] = client.predict(*gen_args(seed, adapter, strength), api_name="/generate")[0]
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 8
    for i in range(8):
        assert np.abs(pixels(results[i]) - pixels(solo[i])).max() == 0, f"request {i} got another's image"


def test_compress_and_train_and_vision(server):
    service, url, data = server
    client = Client(url, verbose=False)
    summary = client.predict("example-attn", 1, api_name="/compress")[0]
    assert summary["new adapter"] == "example-attn-r1" and 0 < summary["mean relative error"] < 1
    status = client.predict("demo-lora", 3, "ui-trained", "tiny-sd", api_name="/train")[0]
    assert "done after 3 steps" in status
    assert "ui-trained" in [a["name"] for a in service.list_adapters()]
    img = data / "shape.png"
    Image.new("RGB", (40, 40), "red").save(img)
    label = client.predict("vision-adaptertune", handle_file(str(img)), api_name="/vision")[0]
    assert {c["label"] for c in label["confidences"]} == {"circle", "square", "triangle", "star", "cross"}
    seg = client.predict("vision-salt", handle_file(str(img)), api_name="/vision")
    assert Image.open(seg[1]).size == (40, 40)


def test_train_tab_runs_a_vision_pipeline(server):
    service, url, data = server
    client = Client(url, verbose=False)
    status = client.predict("pipeline:adaptertune", 2, "ui-shapes", "tiny-sd", api_name="/train")[0]
    assert "done after 2 steps" in status and "ui-shapes" in status and "Vision tab" in status
    assert (data / "adapters" / "trained" / "ui-shapes" / "vision_task.json").is_file()
    img = data / "blue.png"
    Image.new("RGB", (64, 64), "blue").save(img)
    label = client.predict("ui-shapes", handle_file(str(img)), api_name="/vision")[0]
    assert len(label["confidences"]) == 5
    with pytest.raises(AppError, match="not a vision pipeline output"):
        client.predict(str(data / "adapters"), api_name="/load_vision")
