"""`selflengthen operator` subcommands that need no cluster: crd, validate, manifests."""

from __future__ import annotations

import kubernetes_validate
import yaml

from selflengthen.operator.cli import build_parser, main

EXAMPLE = "examples/run.yaml"


def test_crd_check_passes_on_the_checked_in_file(capsys):
    assert main(["crd", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_crd_prints_the_definition(capsys):
    assert main(["crd"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["kind"] == "CustomResourceDefinition"


def test_validate_accepts_the_example_and_explains_a_bad_manifest(tmp_path, capsys):
    assert main(["validate", EXAMPLE]) == 0
    assert "is valid" in capsys.readouterr().out
    bad = yaml.safe_load(open(EXAMPLE))
    bad["spec"]["storage"]["uri"] = "file:///data"
    bad["spec"]["iterations"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "is refused" in out and "spec.iterations" in out


def test_manifests_are_valid_kubernetes_objects(capsys):
    assert main(["manifests", "--image", "ghcr.io/example/selflengthen:0.1.0", "--watch-namespace", "ml"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = [d["kind"] for d in docs]
    assert kinds.count("CustomResourceDefinition") == 3 and "Deployment" in kinds and "ClusterRole" in kinds
    assert "KopfPeering" in kinds
    for doc in docs:
        if doc["kind"] != "KopfPeering":
            kubernetes_validate.validate(doc, "1.37.0", strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    args = build_parser().parse_args(command[3:])
    assert args.namespace == ["ml"] and args.peering == "selflengthen" and args.log_format == "json"
    assert args.liveness.endswith("/healthz")
    # its metrics are served on the pod's IP, on the port the pod declares and announces for scraping
    template = deployment["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    assert args.metrics_addr == "0.0.0.0" and ports["metrics"] == args.metrics_port
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)


def test_run_arguments():
    args = build_parser().parse_args(["run", "-A", "--standalone", "--poll-seconds", "5"])
    assert args.all_namespaces and args.standalone and args.poll_seconds == 5 and args.liveness


def test_the_main_cli_hands_operator_commands_to_the_operator(capsys):
    from selflengthen.cli import main as selflengthen_main

    assert selflengthen_main(["operator", "crd", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
