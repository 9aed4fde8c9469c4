"""The `eiec` command line: compile, run, validate, inspect, dis, report, sweep.

Exit codes: 0 ok; 1 validation outside tolerance; 2 bad input or usage (one line on
stderr naming the file and the problem; a traceback only with --debug); 3 an
internal error in eiec itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable

from . import __version__
from .errors import EiecError
from .progress import PROFILE, Progress

COMMANDS = ("run", "validate", "inspect", "dis", "report", "sweep")

EPILOG = """commands:
  eiec MODEL.onnx -o OUT.eie [options]     compile a model (see eiec --help)
  eiec run OUT.eie --input IN.npz          run on the simulator (eiec run --help)
  eiec validate MODEL.onnx OUT.eie         check against onnxruntime (eiec validate --help)
  eiec inspect OUT.eie                     layers, sizes, compression ratio
  eiec dis OUT.eie                         the instruction stream as text
  eiec report REPORT.json -o report.html   a run report as one HTML page (eiec report --help)
  eiec sweep MODEL.onnx --input TEST.npz --vary target.pes=16,64 -o SWEEP.csv
                                           compile and simulate a grid of recipes (eiec sweep --help)

exit codes: 0 ok, 1 validation outside tolerance, 2 bad input or usage, 3 internal error
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        sys.stderr.write(f"eiec: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _compile_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eiec", description="Compile an ONNX model for an EIE-style sparse accelerator "
                "(prune, share weights, encode, lower) into a .eie file.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to compile")
    p.add_argument("-o", "--output", metavar="OUT.eie", required=True, help="the .eie file to write")
    p.add_argument("--config", metavar="RECIPE.yaml",
                   help="recipe: target hardware and per-layer density/bits (docs/recipe.md); "
                        "default: 64 PEs and automatic per-layer choices")
    p.add_argument("--calibration", metavar="DATA.npz",
                   help="calibration inputs keyed by graph input name (optional 'labels', and 'held_out': "
                        "per-row booleans marking the rows auto scores on); "
                        "without it eiec uses random inputs and says so")
    p.add_argument("--input-shape", metavar="NAME:DIMS", action="append", default=[],
                   help="fix an input's shape, e.g. x:1,3,48,192 (repeatable; '?' keeps a dim free, "
                        "e.g. x:?,3,48,192 keeps a free batch). Needed without --calibration when an "
                        "input has free sizes past the batch; the .eie runs only at these sizes")
    p.add_argument("--dump-ir", metavar="DIR", help="write DIR/<n>_<pass>.onnx and .json after every pass")
    p.add_argument("--pes", type=int, metavar="N", help="number of PEs (overrides the recipe's target.pes)")
    p.add_argument("--max-accuracy-drop", type=float, metavar="P",
                   help="budget for automatic choices: top-1 accuracy points on the calibration labels "
                        "(overrides the recipe's budget.max_accuracy_drop, default 0.5)")
    p.add_argument("--max-output-error", type=float, metavar="E",
                   help="budget for automatic choices without labels: relative L2 output error "
                        "(overrides budget.max_output_error, default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed for random calibration inputs (default 0)")
    _profile(p, "pass and per reconstructed layer")
    p.add_argument("--storage", choices=("huffman", "fixed"), default="huffman",
                   help="how the .eie stores the weights: huffman (default; Deep Compression's storage form, "
                        "the PE images are derived on load) or fixed (the per-PE images themselves, docs/format.md)")
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--version", action="version", version=f"eiec {__version__}")


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eiec run", description="Run a compiled model: host ops in onnxruntime, "
                "segments on the EIE simulator; prints a per-layer cycle/energy table.")
    p.add_argument("eie", metavar="OUT.eie")
    p.add_argument("--input", metavar="IN.npz", required=True, help="inputs keyed by graph input name")
    p.add_argument("-o", "--output", metavar="OUT.npz", help="write the outputs, keyed by output name")
    p.add_argument("--report", metavar="REPORT.json", help="write the cycle/energy report as JSON")
    p.add_argument("--plot", metavar="DIR", help="draw the report's pictures as PNGs into DIR (latency by cause, "
                   "energy by module, per-PE busy/idle per layer, queue occupancy; needs the plot extra)")
    p.add_argument("--float", action="store_true", help="run the simulator's float mode (no fixed point)")
    p.add_argument("--trace", metavar="TRACE.jsonl",
                   help="write one JSON line per executed instruction per input: sample, segment, pc, op, "
                   "start and end cycle (counted from the start of that input's run; docs/simulator.md)")
    _workers(p, "IN.npz's rows are split across the workers; the outputs and the report are those of a run "
                "in one process")
    _profile(p, "simulated segment (and the whole onnxruntime run around them)")
    _common(p)
    return p


def _profile(p: argparse.ArgumentParser, per: str) -> None:
    p.add_argument("--profile", action="store_true",
                   help=f"print wall seconds and peak memory per {per} to stderr at the end "
                        "(also EIEC_PROFILE=1)")


def _validate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eiec validate", description="Check a compiled model against onnxruntime: (1) is "
                "the accelerator path exact (vs the compressed weights in float, within the bound the "
                "fixed-point formats imply), (2) how far is it from the original model.")
    p.add_argument("model", metavar="MODEL.onnx", help="the original model")
    p.add_argument("eie", metavar="OUT.eie", help="its compiled form")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", metavar="IN.npz", help="inputs (and optional 'labels') keyed by input name")
    src.add_argument("--random", type=int, metavar="N", help="N random inputs (default 16)")
    p.add_argument("--bisect", metavar="DIR", help="a --dump-ir folder: report both measures after every pass")
    p.add_argument("--max-drop", type=float, metavar="P",
                   help="exit 1 when top-1 accuracy (or agreement, without labels) drops by more than P points")
    p.add_argument("--json", metavar="REPORT.json", help="also write the results as JSON")
    _workers(p, "the inputs' rows are split across the workers (not with --bisect); the results are those "
                "of a run in one process")
    _common(p)
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eiec report", description="Turn a run report (eiec run --report) into one self-contained "
                "HTML page: its tables and pictures inlined (needs matplotlib, the plot extra).")
    p.add_argument("report", metavar="REPORT.json")
    p.add_argument("-o", "--output", metavar="report.html", required=True, help="the HTML file to write")
    _common(p)
    return p


def _sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eiec sweep", description="Compile every model for every combination of the --vary "
                "values, run the test inputs on the simulator and write one CSV row per point (docs/sweep.md). "
                "Points run as Dask tasks; points that differ only in the target's PE array share one "
                "prune and cluster.")
    p.add_argument("models", metavar="MODEL.onnx", nargs="+", help="the models to sweep")
    p.add_argument("--input", metavar="TEST.npz", required=True,
                   help="test inputs keyed by graph input name; with 'labels' the rows carry accuracy")
    p.add_argument("--vary", metavar="KEY=V1,V2,...", action="append", required=True,
                   help="a recipe key path (target.pes, target.queue_depth, defaults.bits, defaults.density, "
                        "layers.<pattern>.<key>, budget.<name>, ...; docs/recipe.md) or seed, and its values; "
                        "repeat for more keys: the grid is their product")
    p.add_argument("-o", "--output", metavar="SWEEP.csv", required=True, help="the CSV to write")
    p.add_argument("--calibration", metavar="DATA.npz", help="calibration inputs for every compile (as for eiec)")
    p.add_argument("--config", metavar="BASE.yaml", help="the recipe every point starts from (default: the defaults)")
    p.add_argument("--plot", metavar="SWEEP.png",
                   help="also draw the Pareto views, latency vs energy and accuracy vs size (needs eiec[plot])")
    p.add_argument("--seed", type=int, default=0, help="seed of every compile (default 0; --vary seed=... to sweep it)")
    _workers(p, "one task per point")
    _common(p)
    return p


def _workers(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    default = " (default: one per core)" if p.prog == "eiec sweep" else ""
    g.add_argument("--workers", type=int, metavar="N", help=f"run on N local Dask worker processes{default}: {what}")
    g.add_argument("--scheduler", metavar="ADDR",
                   help=f"run on the Dask cluster at ADDR (tcp://HOST:8786): {what}; the files named here "
                        "must be readable by its workers")


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eiec inspect", description="Show a .eie's layers, sizes, densities, bits and "
                "compression ratio (fixed hardware form and Huffman form).")
    p.add_argument("eie", metavar="OUT.eie")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--sensitivity", action="store_true",
                   help="show the per-layer sensitivity scan behind automatic choices")
    _common(p)
    return p


def _dis_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="eiec dis", description="Print every segment's instruction stream, one per line.")
    p.add_argument("eie", metavar="OUT.eie")
    _common(p)
    return p


def _progress(args) -> Callable[[str], None]:
    """Progress lines (and a bar with counts and an ETA on a terminal; timestamped lines
    otherwise, once the compile has run a second: eiec.progress), unless --quiet."""
    if args.quiet:
        return lambda msg: None
    return Progress()


def _cmd_compile(args) -> int:
    from .driver import compile_model
    from .report import size_table

    if args.pes is not None and not (1 <= args.pes <= 4096):
        raise EiecError(None, f"--pes must be in 1..4096, got {args.pes}")
    for flag, v in (("--max-accuracy-drop", args.max_accuracy_drop), ("--max-output-error", args.max_output_error)):
        if v is not None and not (v >= 0):
            raise EiecError(None, f"{flag} must be a number >= 0, got {v}")
    # every input and the output folder are checked before the first byte is written
    # (dumps, the automatic recipe), so a bad argument leaves nothing behind
    shapes = _input_shapes(args.input_shape)
    _check_output(args.output, [args.model, args.config, args.calibration])
    try:
        res = compile_model(args.model, args.output, args.config, args.calibration, args.dump_ir,
                            args.pes, args.seed, _progress(args),
                            budget={"max_accuracy_drop": args.max_accuracy_drop,
                                    "max_output_error": args.max_output_error},
                            input_shapes=shapes, storage=args.storage)
    except EiecError as e:  # errors raised deep in a pass are about the model being compiled
        if e.path is None:
            e.path = args.model
        raise
    for note in res.notes:
        print(f"eiec: note: {note}", file=sys.stderr)
    for warning in res.warnings:
        print(f"eiec: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        print(size_table(res.manifest, file_bytes=os.path.getsize(args.output)))
        print(f"wrote {args.output}")
    return 0


def _input_shapes(specs: list[str]) -> dict[str, tuple[int | None, ...]]:
    """--input-shape NAME:D0,D1,... values, each dim a positive integer or '?'."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            parsed = tuple(None if d.strip() == "?" else int(d) for d in dims.split(","))
        except ValueError:
            parsed = ()
        if not sep or not name or not parsed or any(d is not None and d < 1 for d in parsed):
            raise EiecError(None, f"--input-shape {spec!r}: expected NAME:DIMS with DIMS positive integers "
                                  "or '?', e.g. x:1,3,48,192")
        if name in shapes:
            raise EiecError(None, f"--input-shape {name!r} given twice")
        shapes[name] = parsed
    return shapes


def _check_output(path: str, inputs: list[str | None]) -> None:
    """The output can be written: its folder exists, it is not a folder or one of the inputs."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise EiecError(path, f"cannot write here: folder {folder} does not exist")
    if os.path.isdir(path):
        raise EiecError(path, "is a folder; give a file name for the output")
    for other in inputs:
        if other is not None and os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other):
            raise EiecError(path, f"is also an input ({other}); writing it would destroy the input")


def _cmd_run(args) -> int:
    from .report import cycle_table, saturation_warnings
    from eiec.runtime.session import run_file

    if args.plot is not None:
        from .plots import check_plot_folder
        check_plot_folder(args.plot)
    report = _on_workers(args, lambda client: run_file(args.eie, args.input, args.output, args.report,
                                                       float_mode=args.float, client=client,
                                                       trace_path=args.trace))
    if not args.quiet:
        print(cycle_table(report))
    for line in saturation_warnings(report["saturated"], report["batch"]):
        print(line, file=sys.stderr)
    if args.plot is not None:
        from .plots import write_plots
        paths = write_plots(report, args.plot)
        if not args.quiet:
            print(f"wrote {len(paths)} pictures to {args.plot}")
    return 0


def _cmd_report(args) -> int:
    from .plots import report_cli

    _check_output(args.output, [args.report])
    report_cli(args.report, args.output)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0


def _cmd_validate(args) -> int:
    from eiec.runtime.validate import validate_cli

    if args.json is not None:
        _check_output(args.json, [args.model, args.eie, args.input])
    if args.bisect is not None and (args.workers or args.scheduler):
        raise EiecError(None, "--bisect runs in this process: drop --workers/--scheduler")
    return _on_workers(args, lambda client: validate_cli(args.model, args.eie, args.input, args.random, args.bisect,
                                                         args.max_drop, args.json, quiet=args.quiet, client=client))


def _on_workers(args, fn: Callable):
    """fn(client): on the Dask cluster --workers/--scheduler ask for, else fn(None) in this process."""
    from .workers import check_workers, dask_client

    check_workers(args.workers, args.scheduler)
    if args.workers is None and args.scheduler is None:
        return fn(None)
    with dask_client(args.workers, args.scheduler) as client:
        return fn(client)


def _cmd_sweep(args) -> int:
    from . import sweep
    from .workers import check_workers, dask_client

    check_workers(args.workers, args.scheduler)
    varies = [sweep.parse_vary(v) for v in args.vary]
    keys = [v.key for v in varies]
    if len(set(keys)) != len(keys):
        raise EiecError(None, f"--vary {next(k for k in keys if keys.count(k) > 1)} is given twice")
    _check_output(args.output, [*args.models, args.input, args.config, args.calibration])
    if args.plot is not None:
        _check_output(args.plot, [*args.models, args.input, args.config, args.calibration, args.output])
        sweep.check_plot()
    for path in [*args.models, args.input, args.config, args.calibration]:
        if path is not None and not os.path.isfile(path):
            raise EiecError(path, "no such file")
    with dask_client(args.workers, args.scheduler) as client:
        res = sweep.sweep(args.models, args.input, varies, args.calibration, args.config, args.seed,
                          client, quiet=args.quiet)
    sweep.write_csv(args.output, res)
    if args.plot is not None:
        sweep.plot(args.plot, res)
    if not args.quiet:
        failed = sum(1 for r in res.rows if r["error"])
        print(f"{len(res.rows)} points ({failed} failed, see the error column) in {res.seconds:.1f} s; "
              f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _cmd_inspect(args) -> int:
    from .artifact import load_eie
    from .ir import host_ops
    from .report import inspect_json, sensitivity_table, size_table

    compiled = load_eie(args.eie)
    m, layout = compiled.manifest, compiled.layout
    counts = {h["op"]: h["count"] for h in host_ops(compiled.model)}
    if args.json:
        print(json.dumps(inspect_json(m, counts, layout), indent=2, sort_keys=True))
    else:
        print(size_table(m, counts, sum(layout.values()), layout))
        if args.sensitivity:
            print(sensitivity_table(m))
    return 0


def _cmd_dis(args) -> int:
    from . import isa
    from .artifact import load_eie

    cm = load_eie(args.eie)
    for name, seg in cm.segments.items():
        print(f"{name}: {seg.input} -> {seg.output}  ({len(seg.layers)} layers, "
              f"{'resident' if seg.resident else 'reloaded per inference'})")
        print(isa.disassemble(seg.program, [l.name for l in seg.layers]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        cmd, rest = argv[0], argv[1:]
        parser = {"run": _run_parser, "validate": _validate_parser, "inspect": _inspect_parser,
                  "dis": _dis_parser, "report": _report_parser, "sweep": _sweep_parser}[cmd]()
        handler = {"run": _cmd_run, "validate": _cmd_validate, "inspect": _cmd_inspect, "dis": _cmd_dis,
                   "report": _cmd_report, "sweep": _cmd_sweep}[cmd]
    else:
        parser, handler, rest = _compile_parser(), _cmd_compile, argv
    args = parser.parse_args(rest)
    if getattr(args, "profile", False):
        PROFILE.enabled = True
    try:
        code = handler(args)
        if PROFILE.enabled and PROFILE.steps:
            print(PROFILE.table(), file=sys.stderr)
        return code
    except EiecError as e:
        if args.debug:
            traceback.print_exc()
        print(e.line(), file=sys.stderr)
        return 2
    except OSError as e:  # unreadable input, unwritable output folder, disk full
        if args.debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"eiec: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eiec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in eiec, not the user's mistake
        if args.debug:
            traceback.print_exc()
        print(f"eiec: internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
