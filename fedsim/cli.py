"""The `fedsim` command line: run, resume, sweep, plot, partition, reproduce, gallery, config-reference, list,
flower-run.

Every user error is one line on stderr and an exit status (2 bad input, 3 divergence, 4 no
progress, 130 interrupted; see fedsim/errors.py), never a traceback.
"""
from __future__ import annotations

import argparse
import gc
import signal
import sys
import warnings
from pathlib import Path
from typing import Sequence

from .errors import FedsimError


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .outputs import default_run_dir
    from .runner import execute

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else default_run_dir(config.name)
    progress = False if args.quiet else None
    if args.resume and (out / "config.yaml").is_file():
        from .checkpoint import list_checkpoints
        from .runner import resume

        if list_checkpoints(out):
            print(f"resuming {out} from its newest checkpoint (its own config.yaml is used)")
            run = resume(out, progress=progress)
            _print_final(run, out)
            return 0
        overwrite = True  # a run folder with no checkpoint yet: start over (if fedsim created it)
    else:
        overwrite = args.overwrite
    run = execute(config, out, overwrite=overwrite, progress=progress)
    _print_final(run, out)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from .runner import resume

    out = Path(args.run_dir)
    run = resume(out, progress=False if args.quiet else None)
    _print_final(run, out)
    return 0


def _print_final(run, out: Path) -> None:  # noqa: ANN001
    last = run.rows[-1]
    shown = {k: last[k] for k in ("round", "virtual_time", "test_accuracy", "test_loss", "dist_to_opt") if last.get(k) is not None}
    print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    print(f"run folder: {out}")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import parse_axes, parse_seeds, sweep

    axes = parse_axes(args.overrides)
    if args.seeds is not None:
        seeds = parse_seeds(args.seeds)
    else:  # the config's own seed
        from .config import load_config

        seeds = [load_config(args.config).seed]
    rows = sweep(args.config, axes, seeds, Path(args.out), workers=args.workers, ray_address=args.ray_address,
                 cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run, vectorize=args.vectorize)
    return 0 if all(r["status"] == "done" for r in rows) else 1


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import overlay

    out = overlay(args.runs, args.x, args.y, args.output, labels=args.label, logy=args.logy, title=args.title,
                  group_by=args.group_by)
    print(f"wrote {out}")
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data import build_federated_data
    from .partition_plot import draw, label_counts, summary

    config = load_config(args.config, args.overrides)
    data = build_federated_data(config.data, config.partition, config.seed)
    counts = label_counts(data)
    print(summary(counts))
    out = draw(counts, Path(args.output), f"{config.data.name}, partition {config.partition.name}")
    print(f"wrote {out}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    import time

    from .reproduce import available, check_executor, check_settings, load_paper, reproduce

    check_executor(args.executor)
    check_settings(args.set)
    names = available() if args.name == "all" else [args.name]
    load_paper(names[0])  # an unknown name fails before anything runs
    for name in names:
        out = Path(args.out) / name if args.name == "all" else Path(args.out)
        start = time.perf_counter()
        result = reproduce(name, out, quick=args.quick, executor=args.executor, settings=args.set)
        print(f"{name}: {sum(c.supported is True for c in result.claims)}/{len(result.claims)} claims supported "
              f"({time.perf_counter() - start:.0f} s); see {result.out / 'claims.md'}")
    return 0


def _cmd_gallery(args: argparse.Namespace) -> int:
    import shlex

    from .gallery import build, source_folders

    invocation = "fedsim gallery " + " ".join(shlex.quote(s) for s in args.sources)
    page = build(source_folders(args.sources), Path(args.docs), invocation)
    print(f"wrote {page} and {page.parent / 'gallery'}/")
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from .config.reference import generate

    text = generate()
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def _cmd_flower_run(args: argparse.Namespace) -> int:
    from .flower.run_command import flower_run

    return flower_run(args.flwr_args)


def _cmd_list(args: argparse.Namespace) -> int:
    from . import registry

    if args.kind and not args.config and Path(args.kind).suffix in (".yaml", ".yml"):  # `fedsim list CONFIG`
        args.kind, args.config = None, args.kind
    if args.config:  # its plugins register their components
        from .config import load_config

        load_config(args.config)

    kinds = {
        "strategies": registry.STRATEGIES,
        "protocols": registry.PROTOCOLS,
        "executors": registry.EXECUTORS,
        "data": registry.DATA_SOURCES,
        "partitions": registry.PARTITIONERS,
        "models": registry.MODELS,
        "losses": registry.LOSSES,
        "topologies": registry.TOPOLOGIES,
        "mixing": registry.MIXING,
        "compute": registry.COMPUTE_MODELS,
        "links": registry.LINK_MODELS,
        "availability": registry.AVAILABILITY_MODELS,
        "dropout": registry.DROPOUT_MODELS,
    }
    chosen = [args.kind] if args.kind else list(kinds)
    for name in chosen:
        if name not in kinds:
            raise FedsimError(f"unknown kind {name!r} (known: {', '.join(kinds)})")
        print(f"{name}:")
        for entry in kinds[name].entries():
            print(f"  {entry.name:24s} {entry.summary}")
    return 0


def parser() -> argparse.ArgumentParser:
    """Returns the argument parser of the `fedsim` command."""
    p = argparse.ArgumentParser(prog="fedsim", description="Asynchronous FL and gossip learning on a virtual clock.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an experiment config")
    r.add_argument("config", help="experiment YAML file")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. strategy.server_lr=0.5")
    r.add_argument("--out", help="run folder (default runs/<name>-<timestamp>)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder (only one fedsim created: it holds a .fedsim-run file)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    r.set_defaults(func=_cmd_run)

    rs = sub.add_parser("resume", help="continue an interrupted run from its newest checkpoint")
    rs.add_argument("run_dir", help="the run folder")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    rs.set_defaults(func=_cmd_resume)

    sw = sub.add_parser("sweep", help="run a config for every combination of override values and seeds")
    sw.add_argument("config", help="experiment YAML file")
    sw.add_argument("overrides", nargs="*",
                    help="key=value[,value...]: each key's values; the runs are the product of them and the seeds")
    sw.add_argument("--seeds", help="seeds, e.g. 0,1,2 or 0-4 (default: the config's seed)")
    sw.add_argument("--out", required=True, help="sweep folder: one run folder per run, sweep.csv, summary.csv")
    sw.add_argument("--workers", type=int, default=1, help="local worker processes running runs at once (default 1)")
    sw.add_argument("--ray-address", help="run each run as a Ray task on this cluster (auto, HOST:PORT, ray://...)")
    sw.add_argument("--cpus-per-run", type=float, default=1.0, help="with --ray-address: CPUs each run asks for")
    sw.add_argument("--gpus-per-run", type=float, default=0.0, help="with --ray-address: GPUs each run asks for")
    sw.add_argument("--vectorize", action="store_true",
                    help="run the runs that can share calls together (seeds; combinations that differ in local.lr/momentum/"
                         "weight_decay or in settings that leave the local update unchanged): one vmap call per round")
    sw.set_defaults(func=_cmd_sweep)

    pl = sub.add_parser("plot", help="draw a metric of several runs: mean ± std over seeds per group of runs")
    pl.add_argument("runs", nargs="+", help="run folders, or folders holding run folders (a sweep's)")
    pl.add_argument("--x", default="virtual_time", help="x metric (default virtual_time)")
    pl.add_argument("--y", help="y metric (default: dist_to_opt where measured, else test_accuracy, else test_loss)")
    pl.add_argument("--group-by", action="append", metavar="KEY",
                    help="config key whose values make the curves, e.g. strategy.name (repeatable; default: runs "
                         "whose configs differ only in the seed form one curve)")
    pl.add_argument("--label", action="append", help="legend label per curve, in order (repeat)")
    pl.add_argument("--title", help="figure title (default: the runs' experiment name)")
    pl.add_argument("--logy", action="store_true", help="log-scale y axis")
    pl.add_argument("-o", "--output", required=True, help="image to write; .png, .pdf or .svg")
    pl.set_defaults(func=_cmd_plot)

    pa = sub.add_parser("partition", help="draw a config's per-client label distribution and sizes")
    pa.add_argument("config", help="experiment YAML")
    pa.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.partition.alpha=0.1")
    pa.add_argument("-o", "--output", default="partition.png", help="PNG to write (default: partition.png)")
    pa.set_defaults(func=_cmd_partition)

    rp = sub.add_parser("reproduce", help="re-create a paper's figure and claim table")
    rp.add_argument("name", help="paper name (experiments/papers/<name>/) or 'all'")
    rp.add_argument("--out", required=True, help="output folder for runs, figures and claims.md")
    rp.add_argument("--quick", action="store_true", help="reduced version (a few minutes on 2 cores)")
    rp.add_argument("--executor",
                    help="executor kind for every run: serial, vmap, or ray (one local Ray for all of a paper's runs)")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, after the paper's own (repeatable), e.g. "
                         "--set ray.address=auto --set executor.device=cuda")
    rp.set_defaults(func=_cmd_reproduce)

    ga = sub.add_parser("gallery", help="write docs/gallery.md from reproductions' claims.md and figures")
    ga.add_argument("sources", nargs="+",
                    help="folders written by `fedsim reproduce`, or paper names (NAME: the committed results in "
                         "experiments/papers/NAME/results; all: every paper's)")
    ga.add_argument("--docs", default="docs", help="docs folder to write gallery.md and gallery/ into")
    ga.set_defaults(func=_cmd_gallery)

    ref = sub.add_parser("config-reference", help="print the configuration reference (Markdown)")
    ref.add_argument("-o", "--output", help="write it to this file instead of stdout")
    ref.set_defaults(func=_cmd_reference)

    ls = sub.add_parser("list", help="list registered components")
    ls.add_argument("kind", nargs="?", help="strategies, protocols, executors, data, partitions, models, ...")
    ls.add_argument("config", nargs="?", help="a config file whose plugins to load first (their components are listed too)")
    ls.set_defaults(func=_cmd_list)

    fr = sub.add_parser("flower-run", help="flwr run --stream, exiting non-zero (with Flower's reason) when the run failed")
    fr.add_argument("flwr_args", nargs=argparse.REMAINDER, metavar="APP [CONNECTION] [flwr run options]")
    fr.set_defaults(func=_cmd_flower_run)
    return p


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """fedsim's own warnings as one line (no source line); others as Python formats them."""
    if Path(filename).resolve().is_relative_to(PACKAGE):
        return f"fedsim: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


PACKAGE = Path(__file__).resolve().parent
_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedsim` console script; returns the exit status."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:  # overrides given after options, e.g. `run cfg.yaml --quiet key=value`
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    warnings.formatwarning = _format_warning
    try:
        return args.func(args)
    except FedsimError as exc:
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedsim: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # user code (a plugin, a factory) called sys.exit
        print(f"fedsim: error: sys.exit({exc.code!r}) was called by the run's code (a plugin or a factory)",
              file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = _python_format_warning


def skip_final_collection() -> None:
    """Exempts every live object from the interpreter's garbage collections at exit
    (``gc.freeze``): with torch loaded they cost 0.4-0.7 s of a short run's wall time, for
    memory the OS takes back anyway. Everything the run wrote is already closed."""
    gc.freeze()


def console() -> int:
    """The `fedsim` command: `main` on the command line's arguments, then a quick exit;
    returns the exit status. A Ctrl-C that arrives once the command has finished (say, the
    second of two quick ones) is ignored: everything is written and closed, and during the
    interpreter's shutdown it would only print a traceback from an exit hook."""
    try:
        status = main()
    except KeyboardInterrupt:  # after main's own handling: the run had already stopped
        status = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    skip_final_collection()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console())
