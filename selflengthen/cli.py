"""The `selflengthen` command: run a whole run locally, run one stage (what cluster Jobs do), check a config."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from .pipeline.config import ConfigError, load_config
from .pipeline.urls import redact, redact_log_records


def _config(args: argparse.Namespace):
    # Flags override the file's fields and are validated with them (a URL given as --endpoint is checked too).
    overrides: dict[str, dict] = {}
    if getattr(args, "endpoint", None):
        overrides["models"] = {"endpoint": args.endpoint}
    if getattr(args, "storage", None):
        overrides["storage"] = {"uri": args.storage}
    return load_config(args.config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline.runner import run_local, summary
    from .pipeline.store import open_store

    config = _config(args)
    if args.metrics_port is not None:
        from .pipeline.metrics import serve

        serve(args.metrics_port, args.metrics_addr)
    restart = tuple(s for value in args.restart_from or () for s in value.split(",") if s)
    results = run_local(config, progress=args.progress, restart_from=restart)
    print(summary(config, results, open_store(config.storage.uri, config.storage.endpoint_url).uri))
    return 0


def _model_endpoints(values) -> dict[str, str]:
    """--model-endpoint NAME=URL values: the served names that another server than --endpoint answers."""
    from .pipeline.urls import check_http_url

    out = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name:
            raise ConfigError(f"--model-endpoint {value!r}: NAME=URL wanted")
        try:
            out[name] = check_http_url(url, "--model-endpoint")
        except ValueError as err:
            raise ConfigError(f"--model-endpoint {name}: {err}") from None
    return out


def cmd_stage(args: argparse.Namespace) -> int:
    import json

    from .pipeline.report import refresh_report
    from .pipeline.stages import StageContext, is_main_process, run_stage
    from .pipeline.store import open_store

    config = _config(args)
    # One metrics server a pod: under torchrun only local rank 0 binds the port (the others would collide).
    if args.metrics_port is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        from .pipeline.metrics import serve

        serve(args.metrics_port, args.metrics_addr)
    if not 1 <= args.iteration <= config.iterations:
        raise ConfigError(f"--iteration {args.iteration}: between 1 and iterations ({config.iterations}) wanted")
    store = open_store(config.storage.uri, config.storage.endpoint_url)
    ctx = StageContext(config=config, iteration=args.iteration, store=store, endpoint=config.models.endpoint,
                       model_endpoints=_model_endpoints(args.model_endpoint or ()))
    manifest = run_stage(args.name, ctx)
    # The iteration's report, refreshed after every stage: the last Job of an iteration leaves it complete.
    # stdout carries the manifest only (callers parse it); the report's keys go to the log.
    if is_main_process() and (report := refresh_report(store, config, args.iteration)):
        logging.getLogger("selflengthen.report").info("report of iteration %d: %s", args.iteration,
                                                       ", ".join(f"{store.uri}/{k}" for k in report["keys"]))
    print(json.dumps(manifest, ensure_ascii=False, indent=2))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .pipeline.config import dump_config

    config = _config(args)
    print(dump_config(config) if args.show else f"{args.config}: valid run configuration '{config.name}'")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from .pipeline.tinymodel import ensure_tiny_model

    print(ensure_tiny_model())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Write the generated deployment files (dashboard, rules) into the repository's chart."""
    from pathlib import Path

    from .operator import monitoring

    root = Path(args.root)
    for path in monitoring.write(root / "charts" / "selflengthen"):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .pipeline.stages import STAGES

    parser = argparse.ArgumentParser(prog="selflengthen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a whole Self-Lengthen run on this machine")
    run.add_argument("config", help="run configuration (YAML)")
    run.add_argument("--endpoint", help="use this OpenAI-compatible server instead of starting vLLM")
    run.add_argument("--storage", help="override storage.uri")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    run.add_argument("--restart-from", action="append", metavar="STAGE",
                     help="delete and redo this stage of every iteration and every stage made from it (after a "
                          "change of the configuration that affects it; repeatable)")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port while running")
    run.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port (default loopback)")
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage of one iteration (what cluster Jobs run)")
    stage.add_argument("name", choices=list(STAGES))
    stage.add_argument("--config", required=True)
    stage.add_argument("--iteration", type=int, required=True)
    stage.add_argument("--endpoint", help="OpenAI-compatible server for generating stages")
    stage.add_argument("--model-endpoint", action="append", metavar="NAME=URL",
                       help="the server of the model served as NAME, when not --endpoint (repeatable)")
    stage.add_argument("--storage", help="override storage.uri")
    stage.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port while running")
    # A Job's pod serves its metrics to Prometheus on the pod IP: all interfaces, on purpose.
    stage.add_argument("--metrics-addr", default="0.0.0.0",  # noqa: S104
                       help="address for --metrics-port (a Job pod's IP)")
    stage.set_defaults(func=cmd_stage)

    validate = sub.add_parser("validate", help="check a run configuration")
    validate.add_argument("config")
    validate.add_argument("--show", action="store_true", help="print it with every default filled in")
    validate.set_defaults(func=cmd_validate)

    tiny = sub.add_parser("tiny-model", help="build (once) the tiny local model and print its directory")
    tiny.set_defaults(func=cmd_tiny_model)
    generate = sub.add_parser("generate", help="regenerate the chart's dashboard and rules (for developers)")
    generate.add_argument("--root", default=".", help="repository root")
    generate.set_defaults(func=cmd_generate)
    sub.add_parser("operator", help="the Kubernetes operator and its offline tools: `selflengthen operator --help`")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:  # its own parser (kopf's logging, no SIGTERM override): see operator/cli.py
        from .operator.cli import main as operator_main

        return operator_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact_log_records()  # no URL's userinfo or query string in any log line
    logging.captureWarnings(True)  # library warnings as log records: printed above progress bars, not into them
    for noisy in ("httpx", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # SIGTERM (a Job's pod stopping, a `kill`) unwinds like Ctrl-C, so servers we started are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {redact(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:  # a clear one-line reason instead of a traceback, for expected failures
        from .pipeline.serving import ServerError
        from .pipeline.stages import StageError

        if isinstance(err, (StageError, ServerError, ValueError)):
            # the last log line becomes the pod's termination message, then the run's status and an Event
            print(f"error: {redact(err)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
