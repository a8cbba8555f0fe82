"""`studio demo` (the app on the tiny world) and `studio ui --model PATH` (on a real model)."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_service(
    model: str | None = None,
    adapter_dirs: list[str] = (),
    data_dir: str | None = None,
    device: str | None = None,
    examples: bool = True,
    base_model: str | None = None,
):
    """The service the app runs on: base models, adapter folders, example and vision models.

    The first adapter folder (``<data>/adapters``) is the writable one: uploads and Train-tab
    results go there.  The shipped vision examples (``assets/examples``) load into the
    Vision tab; without them, untrained stand-ins labelled as such.
    """
    from studio.service import StudioService
    from studio.service_vision import demo_vision_models

    data = Path(data_dir or Path.home() / ".cache" / "adapter-studio")
    uploads = data / "adapters"
    uploads.mkdir(parents=True, exist_ok=True)
    shipped = ROOT / "assets" / "adapters"
    vision_examples = ROOT / "assets" / "examples"
    # Relative folders are relative to the working directory (not to the other roots).
    dirs = [uploads, *[Path(d).expanduser().resolve() for d in adapter_dirs]]
    dirs += [d for d in (shipped, vision_examples) if d.is_dir()]
    model_dirs = [Path(model).resolve().parent] if model else []
    service = StudioService(
        model_dirs=model_dirs, adapter_dirs=dirs, output_dir=data / "outputs", device=device
    )
    base = base_model or (Path(model).resolve().name if model else service.default_base_model())
    service.default_model = base
    if examples:
        loaded = _load_shipped(service, shipped, base) if shipped.is_dir() else []
        if not loaded:
            service.add_example_adapters(base)
        if not (vision_examples.is_dir() and _load_vision_examples(service, vision_examples)):
            for vm in demo_vision_models():
                service.add_vision_model(vm)
    return service


def _load_vision_examples(service, folder: Path) -> list[str]:
    """The trained vision examples (assets/examples/vision-*) as Vision-tab models."""
    names = []
    for path in sorted(folder.glob("vision-*")):
        try:
            names += [m["name"] for m in service.load_vision_model(path)]
        except Exception as err:  # noqa: BLE001 - one broken example must not stop the app
            print(f"studio: skipped {path.name}: {str(err).splitlines()[0]}")
    return names


def _load_shipped(service, folder: Path, base: str) -> list[str]:
    """Every adapter folder under assets/adapters that loads on the base model."""
    names = []
    for path in sorted(p.parent for p in folder.rglob("adapter_config.json")):
        try:
            names.append(service.load_adapter(path, base_model=base).name)
        except Exception as err:  # noqa: BLE001 - a shipped adapter for another base is skipped
            print(f"studio: skipped {path.name}: {str(err).splitlines()[0]}")
    return names


def run(args: argparse.Namespace) -> int:
    from ui.app import launch

    if args.command == "ui" and not Path(args.model).is_dir():
        raise FileNotFoundError(
            f"--model must be a local diffusers folder (with model_index.json): {args.model}"
        )
    service = make_service(getattr(args, "model", None), args.adapters, args.data, args.device)
    print(f"studio: base models: {', '.join(m['name'] for m in service.list_base_models())}")
    _, url = launch(service, port=args.port, host=args.host, block=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    for name, text in (("demo", "serve the app on the tiny world"), ("ui", "serve the app on a local model")):
        p = sub.add_parser(name, help=text)
        if name == "ui":
            p.add_argument("--model", required=True, help="a local diffusers pipeline folder")
        p.add_argument("--adapters", action="append", default=[], help="extra adapter folder (repeatable)")
        p.add_argument("--data", default=None, help="uploads and outputs (default ~/.cache/adapter-studio)")
        p.add_argument("--port", type=int, default=7860)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--device", default=None)
        p.set_defaults(func=run)
