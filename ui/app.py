"""The Gradio app: Generate, Compare, Adapters, Vision and Train tabs over studio.service.

``build_app(service, work_dir)`` returns the Blocks; ``launch(...)`` serves it.  All GPU
work shares one queue (``concurrency_id="gpu"``, ``concurrency_limit=1``).
"""

from __future__ import annotations

import math
import tempfile
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from studio.service import StudioService
from studio.service_train import run_trainer, trainers
from ui.handlers import AXIS_KINDS, SLOTS, Handlers, user_errors

GPU = {"concurrency_limit": 1, "concurrency_id": "gpu"}


def build_app(service: StudioService, work_dir: str | Path | None = None) -> gr.Blocks:
    h = Handlers(service, work_dir or service.output_dir or tempfile.mkdtemp(prefix="studio-ui-"))
    models = [m["name"] for m in service.list_base_models()]
    names = h.adapter_names()
    with gr.Blocks(title="Adapter Studio") as app:
        gr.Markdown("# Adapter Studio\nLoad, stack, fuse and compare low-rank adapters.")
        # ------------------------------------------------------------ Generate
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    base = gr.Dropdown(models, value=service.default_base_model(), label="Base model")
                    prompt = gr.Textbox("a red circle", label="Prompt", elem_id="prompt")
                    negative = gr.Textbox("", label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(0, precision=0, label="Seed")
                        steps = gr.Slider(1, 100, 8, step=1, label="Steps")
                        guidance = gr.Slider(1, 15, 5, step=0.5, label="Guidance")
                        size = gr.Dropdown([32, 64, 128, 256, 512, 768, 1024], value=32, label="Size")
                    with gr.Row():
                        precision = gr.Radio(
                            ["fp", "4bit"], value="fp", label="Base weights (fp / 4-bit fused)"
                        )
                        fuse = gr.Checkbox(False, label="Fuse adapters into the weights")
                    slots: list[Any] = []
                    gr.Markdown("**Adapter stack**")
                    for k in range(SLOTS):
                        with gr.Row():
                            first = names[k] if k < len(names) and k == 0 else ""
                            slots.append(gr.Dropdown([""] + names, value=first, label=f"Adapter {k + 1}"))
                            slots.append(gr.Slider(-2, 2, 1, step=0.05, label="Strength"))
                            slots.append(gr.Textbox("", label="Timestep schedule", placeholder="0:1, 1:0"))
                    blocks = gr.Textbox("", label="Per-block factors", placeholder="unet.up_blocks.*=0.5")
                    go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                with gr.Column(scale=2):
                    image = gr.Image(
                        type="pil", format="png", label="Image", elem_id="output-image", height=320
                    )
                    params = gr.Textbox(label="Parameters", lines=4, elem_id="parameters")
        settings_inputs = [
            base,
            prompt,
            negative,
            seed,
            steps,
            guidance,
            size,
            precision,
            fuse,
            blocks,
            *slots,
        ]
        go.click(h.generate, settings_inputs, [image, params], api_name="generate", **GPU)

        # ------------------------------------------------------------ Compare
        with gr.Tab("Compare", id="compare"):
            gr.Markdown(
                "Uses the Generate tab's settings as the template; adds a baseline row with no adapter."
            )
            with gr.Row():
                x_kind = gr.Dropdown(list(AXIS_KINDS), value="strength", label="X axis")
                x_vals = gr.Textbox("0.5, 1", label="X values")
                y_kind = gr.Dropdown(["none", *AXIS_KINDS], value="seed", label="Y axis")
                y_vals = gr.Textbox("1, 2", label="Y values")
            with gr.Row():
                baseline = gr.Checkbox(True, label="Baseline row (no adapter)")
                clip = gr.Checkbox(False, label="CLIP score per cell")
                render = gr.Button("Render grid", variant="primary", elem_id="grid-btn")
            grid_img = gr.Image(type="filepath", format="png", label="Grid", elem_id="grid-image")
            files = gr.File(
                label="Export (grid PNG + JSON sidecar)", file_count="multiple", elem_id="grid-files"
            )
            table = gr.Dataframe(headers=["row", "column", "seed", "CLIP"], label="Cells")
            cells = gr.State({})
            with gr.Row():
                cell_a = gr.Dropdown([], label="A")
                cell_b = gr.Dropdown([], label="B")
            slider = gr.ImageSlider(label="A / B", type="filepath")
        render.click(
            h.grid,
            [x_kind, x_vals, y_kind, y_vals, baseline, clip, *settings_inputs],
            [grid_img, files, table, cells, cell_a, cell_b, slider],
            api_name="grid",
            **GPU,
        )
        for dd in (cell_a, cell_b):
            dd.change(h.ab, [cells, cell_a, cell_b], slider, api_name=False)

        # ------------------------------------------------------------ Adapters
        with gr.Tab("Adapters", id="adapters"):
            adapters_table = gr.Dataframe(
                h.adapter_table(),
                headers=["name", "method", "rank", "bytes", "loaded", "path"],
                label="Adapters",
            )
            refresh = gr.Button("Refresh")
            with gr.Row():
                with gr.Column():
                    disk = gr.Dropdown(
                        h.disk_choices(),
                        label="Adapter on disk (inside the adapter folders)",
                        allow_custom_value=True,
                        elem_id="disk-path",
                    )
                    upload = gr.File(label="Upload an adapter (.safetensors)", type="filepath")
                    new_name = gr.Textbox("", label="Name (optional)")
                    with gr.Row():
                        load_btn = gr.Button("Load from disk", elem_id="load-btn")
                        upload_btn = gr.Button("Load upload")
                with gr.Column():
                    pick = gr.Dropdown(names, label="Loaded adapter")
                    with gr.Row():
                        inspect_btn = gr.Button("Inspect")
                        unload_btn = gr.Button("Unload")
                    with gr.Row():
                        fmt = gr.Radio(
                            ["studio", "diffusers", "kohya"], value="diffusers", label="Convert to"
                        )
                        convert_btn = gr.Button("Convert")
                    with gr.Row():
                        rank = gr.Slider(1, 64, 2, step=1, label="Compress to rank")
                        compress_btn = gr.Button("Compress")
            info = gr.JSON(label="Details", elem_id="adapter-info")
            converted = gr.File(label="Converted file")
        listing = [adapters_table, disk, pick, *slots[0::3]]
        refresh.click(h.refresh, None, listing, api_name=False)
        load_btn.click(h.load_path, [disk, new_name], [info, *listing], api_name="load_adapter", **GPU)
        upload_btn.click(h.upload, [upload, new_name], [info, *listing], api_name="upload_adapter", **GPU)
        inspect_btn.click(h.inspect, pick, info, api_name="inspect")
        unload_btn.click(h.unload, pick, [info, *listing], api_name="unload", **GPU)
        compress_btn.click(h.compress, [pick, rank], [info, *listing], api_name="compress", **GPU)
        convert_btn.click(h.convert, [pick, fmt], converted, api_name="convert")

        # ------------------------------------------------------------ Vision
        with gr.Tab("Vision", id="vision"):
            vision_models = [v["name"] for v in service.list_vision_models()]
            with gr.Row():
                with gr.Column():
                    vmodel = gr.Dropdown(
                        vision_models,
                        value=(vision_models or [None])[0],
                        label="Vision model",
                        allow_custom_value=True,  # a model loaded after the page was built
                    )
                    vsource = gr.Markdown(h.vision_source((vision_models or [""])[0]))
                    vimage = gr.Image(type="pil", label="Image")
                    vrun = gr.Button("Run", variant="primary")
                    with gr.Row():
                        vfolder = gr.Dropdown(
                            service.vision_folders(),
                            label="Trained vision folder (inside the adapter folders)",
                            allow_custom_value=True,
                        )
                        vload = gr.Button("Load folder")
                with gr.Column():
                    scores = gr.Label(label="Class scores")
                    overlay = gr.Image(type="pil", format="png", label="Mask overlay")
        vrun.click(h.vision, [vmodel, vimage], [scores, overlay], api_name="vision", **GPU)
        vmodel.change(h.vision_source, vmodel, vsource, api_name=False)
        vision_listing = [vmodel, vfolder]
        vload.click(h.load_vision, vfolder, [vsource, *vision_listing], api_name="load_vision")

        # ------------------------------------------------------------ Train
        with gr.Tab("Train", id="train"):
            names_tr = list(trainers())
            with gr.Row():
                first = "pipeline:adaptertune" if "pipeline:adaptertune" in names_tr else names_tr[0]
                trainer = gr.Dropdown(names_tr, value=first, label="Pipeline")
                tsteps = gr.Slider(1, 500, 20, step=1, label="Steps")
                tname = gr.Textbox("", label="Result name", placeholder="trained-<pipeline>")
            gr.Markdown(
                "`pipeline:*` trains on the tiny world through the shared loop; the result appears in "
                "the Vision tab. `demo-lora` trains a diffusion LoRA for the adapter list."
            )
            with gr.Row():
                start = gr.Button("Start", variant="primary")
                cancel = gr.Button("Cancel")
            status = gr.Markdown("idle")
            loss_plot = gr.LinePlot(x="step", y="loss", color="stage", label="Loss")
            stop_flag = gr.State(None)
        train_event = start.click(
            _train_stream(service),
            [trainer, tsteps, tname, base, stop_flag],
            [status, loss_plot, stop_flag],
            api_name="train",
            concurrency_limit=1,
            concurrency_id="train",
        )
        train_event.then(h.refresh, None, listing).then(h.refresh_vision, vmodel, vision_listing)
        cancel.click(_cancel, stop_flag, status, api_name=False)
    return app


def _cancel(flag: threading.Event | None) -> str:
    if flag is not None:
        flag.set()
    return "cancelling..."


def _train_stream(service: StudioService):
    """A generator handler: runs the trainer in a thread and streams progress and loss.

    Stages outside the optimizer steps (SALT's source training, the final evaluation) show
    in the status line, and a stage's loss as its own curve.  Not in the GPU queue:
    pipeline runs do not hold the service lock, so generation stays responsive while they
    train (``demo-lora`` holds it, as it trains the shared UNet).
    """

    @user_errors
    def train(trainer: str, steps: float, name: str, base_model: str, _flag: Any):
        import pandas as pd

        stop = threading.Event()
        history: list[tuple[str, int, float]] = []  # (stage, step, loss); "train" for the optimizer steps
        now = {"line": f"step 0/{int(steps)}"}
        outcome: dict[str, Any] = {}

        def frame() -> pd.DataFrame:
            return pd.DataFrame(list(history), columns=["stage", "step", "loss"])

        def on_progress(step: int, total: int, loss: float) -> None:
            history.append(("train", step, loss))
            now["line"] = f"step {step}/{total}"

        def on_stage(stage: str, step: int, total: int, loss: float) -> None:
            if math.isfinite(loss):
                history.append((stage, step, loss))
            now["line"] = (
                "evaluating on the held-out images"
                if stage == "evaluate"
                else f"{stage} stage {step}/{total}, loss {loss:.4f}"
            )

        def work() -> None:
            try:
                outcome["summary"] = run_trainer(
                    service,
                    trainer,
                    int(steps),
                    on_progress,
                    stop.is_set,
                    base_model,
                    name=(name or "").strip() or None,
                    on_stage=on_stage,
                )
            except Exception as err:  # noqa: BLE001 - reported in the page below
                outcome["error"] = err

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            yield f"training {trainer}: {now['line']}", frame(), stop
        if "error" in outcome:
            raise outcome["error"]
        yield train_message(outcome["summary"]), frame(), None

    return train


def train_message(summary: dict[str, Any]) -> str:
    """The Train tab's closing line for a ``run_trainer`` summary."""
    word = "cancelled" if summary["stopped"] else "done"
    names = ", ".join(f"**{n}**" for n in summary["names"])
    if not summary["names"]:
        return f"{word} before training started"
    where = "in the adapter list" if summary["kind"] == "adapter" else "in the Vision tab"
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in summary["metrics"].items() if k in METRICS_SHOWN)
    return f"{word} after {summary['steps']} steps; {names} {where}" + (
        f" (held-out {metrics})" if metrics else ""
    )


METRICS_SHOWN = ("accuracy", "miou", "dice")


def launch(
    service: StudioService,
    port: int | None = None,
    host: str = "127.0.0.1",
    block: bool = True,
    work_dir: str | Path | None = None,
) -> tuple[gr.Blocks, str]:
    """Serve the app; returns (app, local URL).  With ``block=False`` it runs in the background."""
    work = Path(work_dir or service.output_dir or tempfile.mkdtemp(prefix="studio-ui-"))
    app = build_app(service, work)
    app.queue(default_concurrency_limit=4)
    allowed = [str(work)] + [str(p) for p in service.adapter_dirs]
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=allowed,
        show_error=True,
        quiet=True,
    )
    return app, url
