"""`selflengthen operator ...` (also `python -m selflengthen.operator ...`).

    selflengthen operator run [-n NS ...|-A] [--liveness URL] [--peering NAME|--standalone] [--log-format json]
                              [--metrics-port PORT --metrics-addr ADDR]
    selflengthen operator crd [--write|--check]        the CustomResourceDefinition (crds/, and the chart's
                                                       crds/ and RBAC rules: one source)
    selflengthen operator validate run.yaml ...        admission checks of the CRD (schema + CEL), offline
    selflengthen operator manifests --image IMAGE      CRD, RBAC and the operator's Deployment, for kubectl apply
"""

from __future__ import annotations

import argparse
import sys

import yaml


def cmd_run(args: argparse.Namespace) -> int:
    from .handlers import run_operator

    if args.all_namespaces and args.namespace:
        print("error: --namespace and --all-namespaces exclude each other", file=sys.stderr)
        return 2
    if args.metrics_port is not None:
        from ..pipeline.metrics import metrics, serve

        metrics()  # the run series (selflengthen_run_*) on the default registry, beside the process metrics
        serve(args.metrics_port, args.metrics_addr)
    run_operator(namespaces=args.namespace or [], clusterwide=args.all_namespaces, liveness=args.liveness,
                 peering=args.peering, standalone=args.standalone, priority=args.priority,
                 log_format=args.log_format, verbose=args.verbose, poll_seconds=args.poll_seconds)
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from . import crd_files, deploy

    if args.write:
        for path in (*(crd_files.write(p) for p in crd_files.CRD_PATHS), *deploy.write_chart_files()):
            print(f"wrote {path}")
        return 0
    if args.check:
        stale = [*crd_files.stale(), *deploy.stale_chart_files()]
        for path in stale:
            print(f"{path} is out of date: run `python -m selflengthen.operator crd --write`", file=sys.stderr)
        if stale:
            return 1
        print(f"{', '.join(str(p) for p in crd_files.CRD_PATHS)} and the chart's generated files are up to date")
        return 0
    sys.stdout.write(crd_files.render())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ..pipeline.config import ConfigError
    from ..pipeline.urls import redact
    from ..pipeline.yamlfile import YAMLFileError, load_documents, shorten
    from .spec import parse_spec
    from .validation import validate

    bad = 0
    for path in args.files:
        try:
            docs = load_documents(path)
        except YAMLFileError as err:  # one line naming file, line and column
            print(f"{err}")
            bad += 1
            continue
        runs = 0
        for number, doc in enumerate(docs, 1):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                print(f"{path}: document {number} is a {type(doc).__name__}, not a Kubernetes object")
                bad += 1
                continue
            if doc.get("kind") != "SelfLengthenRun":
                continue
            runs += 1
            metadata = doc.get("metadata")
            name = metadata.get("name") if isinstance(metadata, dict) else None
            name = shorten(name, 80) if isinstance(name, str) else "(no name)"
            errors = validate(doc)
            if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
                errors.insert(0, "metadata.name: Required value: a string")
            if not errors:
                try:
                    parse_spec(metadata["name"], doc.get("spec") or {})
                except ConfigError as err:
                    errors = str(err).splitlines()[1:]
            if errors:
                bad += 1
                print(f"{path}: SelfLengthenRun {name} is refused:")
                for e in errors:
                    print(f"  {shorten(redact(e.strip()), 400)}")
            else:
                print(f"{path}: SelfLengthenRun {name} is valid")
        if not runs:
            print(f"{path}: no SelfLengthenRun in this file (kind: SelfLengthenRun wanted)")
            bad += 1
    return 1 if bad else 0


def cmd_manifests(args: argparse.Namespace) -> int:
    from .deploy import manifests

    docs = manifests(image=args.image, namespace=args.namespace, watch_namespaces=args.watch_namespace or [],
                     replicas=args.replicas)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, width=120))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selflengthen operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator (kopf)")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", help="namespace to serve (repeatable; globs allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve the whole cluster")
    run.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                     help="liveness endpoint URL (empty: none); default %(default)s")
    peering = run.add_mutually_exclusive_group()
    peering.add_argument("--peering", help="KopfPeering object name: replicas pause unless they have the highest "
                         "priority, so two never act at once (default: 'default' when it exists)")
    peering.add_argument("--standalone", action="store_true", help="no peering (exactly one replica!)")
    run.add_argument("--priority", type=int, help="peering priority (default: random, so replicas differ)")
    run.add_argument("--log-format", choices=["json", "plain", "full"], default="json")
    run.add_argument("--poll-seconds", type=float, default=30.0,
                     help="reconcile each run at least this often (changes of children wake it at once)")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: none)")
    run.add_argument("--metrics-addr", default="127.0.0.1",
                     help="address for --metrics-port (default loopback; 0.0.0.0 in a pod)")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    crd = sub.add_parser("crd", help="print, write or check the CustomResourceDefinition")
    group = crd.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="regenerate crds/selflengthenrun.yaml and the chart's "
                       "copy, peering CRDs and RBAC rules (charts/selflengthen/crds/, rbac/)")
    group.add_argument("--check", action="store_true", help="fail when any of those is out of date")
    crd.set_defaults(func=cmd_crd)

    validate = sub.add_parser("validate", help="check SelfLengthenRun manifests as the API server would")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=cmd_validate)

    manifests = sub.add_parser("manifests", help="print CRD + RBAC + operator Deployment")
    manifests.add_argument("--image", required=True, help="the selflengthen image (it contains the operator)")
    manifests.add_argument("--namespace", default="selflengthen-system", help="where the operator runs")
    manifests.add_argument("--watch-namespace", action="append",
                           help="serve only these namespaces (default: the whole cluster)")
    manifests.add_argument("--replicas", type=int, default=2, help="operator replicas (peering keeps one active)")
    manifests.set_defaults(func=cmd_manifests)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
