"""`studio grid`: a labelled comparison grid with a JSON sidecar; `--from` re-renders one."""

from __future__ import annotations

import argparse

from studio.commands.generate import add_model_arguments, build


def run(args: argparse.Namespace) -> int:
    from studio.grid import read_sidecar, write_grid
    from studio.service import StudioService
    from studio.service_grid import Axis, GridSpec

    if args.from_sidecar:
        planned, sources = read_sidecar(args.from_sidecar)
        base_models = sorted({c.settings.base_model for c in planned.cells})
        dirs = sorted(
            {str(p.rsplit("/", 1)[0]) for p in sources.values() if p and not p.startswith("builtin:")}
        )
        service = StudioService(adapter_dirs=dirs, device=args.device)
        service.ensure_adapters(sources, base_models[0])
        result = service.render_grid(planned, batched=not args.cell_by_cell, clip=args.clip)
    else:
        if not args.x:
            raise ValueError("give --x KIND=V1,V2,... (or --from SIDECAR)")
        service, settings = build(args)
        spec = GridSpec(
            settings, Axis.parse(args.x), Axis.parse(args.y) if args.y else None, not args.no_baseline
        )
        result = service.render_grid(spec, batched=not args.cell_by_cell, clip=args.clip)
        sources = service.adapter_sources({a.name for c in result.cells for a in c.settings.adapters})
    paths = write_grid(result, args.out, adapter_sources=sources)
    print(f"wrote {paths['grid']} and {paths['sidecar']} ({len(result.cells)} cells, {result.seconds:.2f} s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="render a comparison grid (PNG + JSON sidecar + cells)")
    add_model_arguments(p)
    p.add_argument(
        "--x", help="columns: KIND=V1,V2,... with KIND in adapter, strength, seed, guidance, steps, precision"
    )
    p.add_argument("--y", help="rows, same form as --x")
    p.add_argument("--no-baseline", action="store_true", help="leave out the no-adapter baseline row")
    p.add_argument(
        "--from", dest="from_sidecar", metavar="SIDECAR", help="re-render a grid.json (or grid.png)"
    )
    p.add_argument("--cell-by-cell", action="store_true", help="one pipeline call per cell (for comparison)")
    p.add_argument("--clip", action="store_true", help="add a CLIP score per cell (tiny world CLIP)")
    p.add_argument("--out", default="grid", help="output folder")
    p.set_defaults(func=run)
