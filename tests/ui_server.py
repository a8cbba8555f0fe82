"""Start the studio app in-process on a free port for the UI tests."""

from __future__ import annotations

import socket

from studio.commands.ui import make_service
from ui.app import launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir):
    """(service, app, url) of the demo app on the from-config tiny pipeline, CPU."""
    service = make_service(None, [], str(data_dir), device="cpu", base_model="tiny-sd")
    app, url = launch(service, port=free_port(), block=False, work_dir=data_dir / "work")
    return service, app, url
