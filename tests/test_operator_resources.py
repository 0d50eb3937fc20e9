"""Children of a run: valid for the Kubernetes 1.37 schemas (strict), named deterministically within limits,
labelled and owned, running the real `selflengthen stage` command line, and holding no secret values."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml

from kube_fixtures import make_run, spec
from selflengthen.cli import build_parser
from selflengthen.operator import resources as r
from selflengthen.operator.spec import ALL_STAGES, DATA_STAGES, LF_MODEL, MAX_RUN_NAME, TRAIN_STAGES
from selflengthen.pipeline.config import ConfigError, parse_config
from selflengthen.pipeline.stages import STAGES

from job_controller import action, job_failed
from job_controller import validate as validate_job

K8S = "1.37.0"

VARIANTS = {
    "default": spec(),
    "multi-node": spec(training={"nodes": 4, "processesPerNode": 8}, inference={"tensorParallelSize": 4}),
    "one-node-multi-gpu": spec(training={"processesPerNode": 8}),
    "kueue-and-scheduling": spec(scheduling={
        "queueName": "gpu-queue", "nodeSelector": {"nvidia.com/gpu.product": "H100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "batch", "serviceAccountName": "runner", "imagePullSecrets": ["regcred"]}),
    "hf-token-and-cache": spec(inference={"hfTokenSecret": {"name": "hf", "key": "token"},
                                          "modelCacheClaim": "hf-cache", "maxModelLen": 32768,
                                          "extraArgs": ["--enable-prefix-caching"]}),
    "full-two-iterations": spec(iterations=2, training={"mode": "full"}),
    "no-secret": {**spec(), "storage": {"uri": "s3://bucket-x/p", "endpointUrl": "http://minio.minio:9000"}},
}


def children(run: r.Run) -> list[dict]:
    out = [r.config_map(run), r.serving_service(run, 0), r.serving_deployment(run, 0, 1),
           r.serving_deployment(run, 1, 2), r.serving_service(run, 1)]
    for stage in DATA_STAGES:
        out.append(r.stage_job(run, 1, stage, 1, endpoint_url=r.endpoint(run, 0)))
        out.append(r.stage_job(run, 2, stage, 1, endpoint_url=r.endpoint(run, 1), routes=r.model_endpoints(run, 1)))
    out.append(r.stage_job(run, 1, "build-sft", 1))
    out.append(r.stage_job(run, 1, "evaluate", 3, endpoint_url=r.endpoint(run, 1)))
    for stage in TRAIN_STAGES[1:]:
        out.append(r.training_job(run, 1, stage, 9))
        out.append(r.training_service(run, 1, stage, 9))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_children_pass_strict_schema_validation(variant):
    run = make_run(VARIANTS[variant])
    for obj in children(run):
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_names_are_deterministic_and_fit_kubernetes_limits():
    run = make_run(name="a" + "b" * (MAX_RUN_NAME - 1))
    for obj in children(run):
        name = obj["metadata"]["name"]
        assert len(name) <= 63, name
        if obj["kind"] == "Job" and obj["spec"].get("completionMode") == "Indexed":
            assert len(f"{name}-127") <= 63  # pod hostnames <job>-<index>
    assert r.job_name("demo", 2, "train-generator", 3) == "demo-i02-train-generator-a3"
    assert r.deployment_name("demo", 1, 2) == "demo-m01-vllm-a2"
    assert r.serving_name("demo", 0) == "demo-m00-vllm"


def test_labels_and_owner_references():
    run = make_run()
    for obj in children(run):
        labels = obj["metadata"]["labels"]
        assert labels["selflengthen.io/run"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "selflengthen-operator"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "selflengthen.io/v1alpha1", "kind": "SelfLengthenRun", "name": "demo",
                         "uid": "uid-demo", "controller": True, "blockOwnerDeletion": True}
        if obj["kind"] in ("Job", "Deployment"):
            template = obj["spec"]["template"]["metadata"]["labels"]
            assert template["selflengthen.io/run"] == "demo"
            if obj["kind"] == "Deployment":
                assert obj["spec"]["selector"]["matchLabels"].items() <= template.items()


def _stage_args(job: dict) -> list[str]:
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    return command[command.index("selflengthen") + 1:]


def test_jobs_run_the_real_stage_command_with_the_mounted_config():
    from selflengthen.cli import _model_endpoints

    parser = build_parser()
    full = make_run(spec(iterations=2, training={"mode": "full", "nodes": 2}))
    for obj in children(make_run(spec(training={"nodes": 2}))) + children(full):
        if obj["kind"] != "Job":
            continue
        args = parser.parse_args(_stage_args(obj))
        assert args.command == "stage" and args.config == r.CONFIG_FILE
        assert args.iteration == int(obj["metadata"]["labels"]["selflengthen.io/iteration"])
        # full fine-tuning: the models of iteration 1 not at --endpoint, as the stage reads them
        routes = r.model_endpoints(full, 1) if obj in children(full) and args.iteration == 2 else {}
        assert _model_endpoints(args.model_endpoint or ()) == routes
        assert args.name in STAGES
        stage = obj["metadata"]["labels"]["selflengthen.io/stage"]
        assert args.name == stage
        assert bool(args.endpoint) == (stage in DATA_STAGES or stage == "evaluate")
        mounts = {m["mountPath"]: m["name"] for m in obj["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts[r.CONFIG_DIR] == "config"
        assert obj["spec"]["backoffLimit"] == 0
        assert obj["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_operator_stage_names_exist_in_the_pipeline():
    assert set(ALL_STAGES) <= set(STAGES)


def test_config_map_round_trips_to_the_same_run_configuration():
    run = make_run()
    cm = r.config_map(run)
    loaded = parse_config(yaml.safe_load(cm["data"]["config.yaml"]))
    assert loaded == run.config
    assert loaded.name == "demo" and loaded.models.endpoint is None
    assert cm["metadata"]["annotations"][r.CONFIG_HASH] == r.config_hash(run)


def test_credentials_only_as_secret_references():
    run = make_run(spec(inference={"hfTokenSecret": {"name": "hf", "key": "token"}}))
    text = json.dumps(children(run))
    for obj in children(run):
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            for env in c["env"]:
                if env["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"]
            assert not any(a.startswith(("sh", "bash")) for a in c["command"][:1])  # no shell strings
    assert "s3-credentials" in text


def test_vllm_deployment_serving_base_then_adapters():
    run = make_run()
    base = r.serving_deployment(run, 0, 1)
    pod = base["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:3] == ["vllm", "serve", "Qwen/Qwen2-7B-Instruct"]
    args = c["command"]
    assert args[args.index("--served-model-name") + 1: args.index("--served-model-name") + 4] == [
        "generator", "extender", "base"]  # the base also under its own name: self-instruct asks it
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert "initContainers" not in pod
    assert base["spec"]["strategy"] == {"type": "Recreate"}

    tuned = r.serving_deployment(run, 1, 1)
    pod = tuned["spec"]["template"]["spec"]
    args = pod["containers"][0]["command"]
    assert "--enable-lora" in args
    i = args.index("--lora-modules")
    assert args[i + 1: i + 3] == ["generator=/adapters/generator", "extender=/adapters/extender"]
    assert args[args.index("--max-lora-rank") + 1] == "8"  # training.lora.rank 8
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["python", "-m", "selflengthen.operator.fetch"]
    assert "demo/iter-01/train-generator/model=/adapters/generator" in init["command"]
    assert "demo/iter-01/train-extender/model=/adapters/extender" in init["command"]


def test_full_fine_tuning_serves_each_role_from_its_own_weights_in_every_iteration():
    run = make_run(spec(iterations=2, training={"mode": "full"}))
    (base,) = r.serving_deployment(run, 0, 1)["spec"]["template"]["spec"]["containers"]  # iteration 1: the base
    assert base["command"][2] == "Qwen/Qwen2-7B-Instruct"
    for k in (1, 2):
        pod = r.serving_deployment(run, k, 1)["spec"]["template"]["spec"]
        by_name = {c["name"]: c for c in pod["containers"]}
        assert sorted(by_name) == ["vllm", "vllm-base", "vllm-extender"]
        served = {}
        for c in pod["containers"]:
            args = c["command"]
            names = args[args.index("--served-model-name") + 1: args.index("--host")]
            served[tuple(names)] = (args[2], int(args[args.index("--port") + 1]), c["ports"][0]["name"])
            assert "--enable-lora" not in args and c["resources"]["limits"]["nvidia.com/gpu"] == 1  # GPUs each
            assert c["readinessProbe"]["httpGet"]["port"] == c["ports"][0]["name"]
        # each role's own trained weights, the base model under its own name, each on its own port
        assert served == {("generator",): ("/adapters/generator", 8000, "http"),
                          ("extender",): ("/adapters/extender", 8001, "http-extender"),
                          ("base",): ("Qwen/Qwen2-7B-Instruct", 8002, "http-base")}
        (init,) = pod["initContainers"]
        assert f"demo/iter-{k:02d}/train-generator/model=/adapters/generator" in init["command"]
        assert f"demo/iter-{k:02d}/train-extender/model=/adapters/extender" in init["command"]
        svc = r.serving_service(run, k)
        assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
            ("http", 8000, "http"), ("http-extender", 8001, "http-extender"), ("http-base", 8002, "http-base")]
        assert r.endpoint(run, k) == f"http://demo-m{k:02d}-vllm.ml.svc:8000/v1"
        routes = r.model_endpoints(run, k)
        assert routes == {"extender": f"http://demo-m{k:02d}-vllm.ml.svc:8001/v1",
                          "base": f"http://demo-m{k:02d}-vllm.ml.svc:8002/v1"}
        cmd = r.stage_job(run, 2, "extend", 1, endpoint_url=r.endpoint(run, k), routes=routes)[
            "spec"]["template"]["spec"]["containers"][0]["command"]
        assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--model-endpoint"] == [
            f"base=http://demo-m{k:02d}-vllm.ml.svc:8002/v1", f"extender=http://demo-m{k:02d}-vllm.ml.svc:8001/v1"]
    # the length-following model: its own weights as the Generator, nothing else
    lf = r.serving_deployment(make_run(spec(iterations=2, training={"mode": "full"}, collect={"enabled": True},
                                            lengthFollowing={"enabled": True})), LF_MODEL, 1)
    (c,) = lf["spec"]["template"]["spec"]["containers"]
    assert c["command"][2:5] == ["/adapters/generator", "--served-model-name", "generator"]
    assert "demo/train-length-following/model=/adapters/generator" in lf["spec"]["template"]["spec"][
        "initContainers"][0]["command"]
    # LoRA: one server, no routes
    assert r.model_endpoints(make_run(), 1) == {} and len(r.serving_service(make_run(), 1)["spec"]["ports"]) == 1
    with pytest.raises(ConfigError, match="inference.port: at most 65533 with training.mode full"):
        make_run(spec(iterations=2, training={"mode": "full"}, inference={"port": 65534}))


def test_multi_node_training_is_an_indexed_job_with_torchrun_rendezvous():
    run = make_run(spec(training={"nodes": 4, "processesPerNode": 8}))
    job = r.training_job(run, 2, "train-extender", 1)
    svc = r.training_service(run, 2, "train-extender", 1)
    name = "demo-i02-train-extender-a1"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == name == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    c = pod["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["MASTER_ADDR"] == f"{name}-0.{name}.ml.svc"
    assert env["NNODES"] == "4" and env["NPROC_PER_NODE"] == "8"
    assert "job-completion-index" in env["NODE_RANK"]["fieldRef"]["fieldPath"]
    assert c["command"][0] == "torchrun" and c["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_fetch_helper_copies_trained_trees(tmp_path):
    from selflengthen.operator.fetch import main
    from selflengthen.pipeline.store import open_store
    from selflengthen.pipeline.treestore import upload_tree

    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    store = open_store(f"file://{tmp_path / 'store'}")
    upload_tree(store, src, "demo/iter-01/train-generator/model")
    dest = tmp_path / "out" / "generator"
    assert main(["--storage", store.uri, f"demo/iter-01/train-generator/model={dest}"]) == 0
    assert (dest / "adapter_config.json").read_text() == "{}"
    assert main(["--storage", store.uri, f"demo/iter-01/train-extender/model={tmp_path / 'x'}"]) == 1


def _pod_specs(run: r.Run) -> list[dict]:
    return [obj["spec"]["template"]["spec"] for obj in children(run) if obj["kind"] in ("Deployment", "Job")]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_runs_non_root_with_a_read_only_root_filesystem(variant):
    pods = _pod_specs(make_run(VARIANTS[variant]))
    assert pods
    for pod in pods:
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
            # the one writable place besides the data volumes, where $HOME (caches) points
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
            assert {"name": "HOME", "value": "/tmp"} in c["env"]
            assert {"name": "USER", "value": "selflengthen"} in c["env"]  # the uid has no passwd entry
        # the volumes (a model cache of many GB) are chowned to fsGroup once, not at every pod start
        assert ctx["fsGroupChangePolicy"] == "OnRootMismatch"


def test_the_read_only_root_filesystem_can_be_turned_off_for_an_image_that_needs_it():
    run = make_run(spec(security={"readOnlyRootFilesystem": False, "runAsUser": 1000}))
    for pod in _pod_specs(run):
        assert pod["securityContext"]["runAsUser"] == 1000
        assert all(c["securityContext"]["readOnlyRootFilesystem"] is False for c in pod["containers"])


def test_root_is_refused():
    from selflengthen.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="security.runAsUser"):
        make_run(spec(security={"runAsUser": 0}))


def test_secret_env_reaches_the_model_facing_jobs_by_secret_reference_only():
    run = make_run(spec(evaluate={"enabled": True, "judge": {"enabled": True, "apiKeyEnv": "JUDGE_KEY"}},
                        secretEnv=[{"name": "JUDGE_KEY", "secretKeyRef": {"name": "judge", "key": "token"}}]))
    wanted = {"name": "JUDGE_KEY", "valueFrom": {"secretKeyRef": {"name": "judge", "key": "token"}}}
    for stage in (*DATA_STAGES, "evaluate", "collect"):
        job = r.stage_job(run, 2, stage, 1, endpoint_url=r.endpoint(run, 1))
        assert wanted in job["spec"]["template"]["spec"]["containers"][0]["env"], stage
    for job in (r.stage_job(run, 1, "build-sft", 1), r.training_job(run, 1, "train-generator", 1)):
        assert all(e["name"] != "JUDGE_KEY" for e in job["spec"]["template"]["spec"]["containers"][0]["env"])


@pytest.mark.parametrize("overrides, field", [
    ({"evaluate": {"judge": {"enabled": True, "apiKeyEnv": "JUDGE_KEY"}}}, "evaluate.judge.apiKeyEnv"),
    ({"secretEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "secretKeyRef": {"name": "x", "key": "y"}}]}, "secretEnv"),
    ({"secretEnv": [{"name": "K", "secretKeyRef": {"name": "x", "key": "y"}}] * 2}, "secretEnv"),
])
def test_secret_env_mistakes_are_refused_naming_the_field(overrides, field):
    from selflengthen.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        make_run(spec(**overrides))


@pytest.mark.parametrize("image, expected", [
    ("ghcr.io/you/selflengthen:0.1.0", "ghcr.io/you/selflengthen-training:0.1.0"),
    ("registry:5000/team/selflengthen", "registry:5000/team/selflengthen-training"),
    ("selflengthen-training:0.1.0", "selflengthen-training:0.1.0"),
])
def test_training_jobs_default_to_the_training_image_beside_spec_image(image, expected):
    run = make_run(spec(image=image))
    assert r.training_job(run, 1, "train-generator", 1)["spec"]["template"]["spec"]["containers"][0]["image"] == \
        expected
    assert r.stage_job(run, 1, "build-sft", 1)["spec"]["template"]["spec"]["containers"][0]["image"] == image
    explicit = make_run(spec(image=image, training={"image": "mine/train:7"}))
    assert explicit.cluster.training_image == "mine/train:7"


def test_a_digest_pinned_image_needs_an_explicit_training_image():
    from selflengthen.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="training.image: required"):
        make_run(spec(image="ghcr.io/you/selflengthen@sha256:" + "a" * 64))


# -- disruptions, resources, placement, vLLM limits ------------------------------------------------------------------


def _failed_pod(*, exit_code: int = 1, disruption: str | None = None) -> dict:
    """A failed pod as the kubelet and the controllers leave it: its container's exit code, and the DisruptionTarget
    condition when something outside killed it (the scheduler preempting it, an eviction or drain, the taint manager
    or the pod GC after its node was lost)."""
    conditions = [{"type": "Ready", "status": "False"}]
    if disruption:
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": disruption})
    return {"status": {"phase": "Failed", "conditions": conditions, "containerStatuses": [
        {"name": "stage", "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_job_pod_failure_policies_are_valid(variant):
    for obj in children(make_run(VARIANTS[variant])):
        if obj["kind"] == "Job":
            validate_job(obj)


@pytest.mark.parametrize("disruption", ["PreemptionByScheduler", "EvictionByEvictionAPI", "DeletionByTaintManager",
                                        "DeletionByPodGC", "TerminationByKubelet"])
def test_disruptions_do_not_use_up_an_attempt_but_container_failures_do(disruption):
    run = make_run(spec(training={"nodes": 2}))
    for job in (r.stage_job(run, 1, "respond", 1, endpoint_url=r.endpoint(run, 0)),
                r.training_job(run, 1, "train-generator", 1)):
        # preempted, evicted, drained, its node lost (SIGKILL: 137): the Job replaces the pod, no failure counted
        disrupted = _failed_pod(exit_code=137, disruption=disruption)
        assert action(job, disrupted) == "Ignore"
        assert not job_failed(job, [disrupted, disrupted])
        # the stage's own failure counts: backoffLimit 0, the Job fails and the operator makes the next attempt
        assert action(job, _failed_pod(exit_code=1)) == "Count"
        assert job_failed(job, [disrupted, _failed_pod(exit_code=1)])
        # a replacement pod starts only once the old one is gone (GPUs), and runs the same command, which resumes
        # from the store (tests/test_training.py::test_interrupted_training_resumes_from_the_stored_checkpoint)
        assert job["spec"]["podReplacementPolicy"] == "Failed"


def test_the_job_controller_stand_in_refuses_what_the_api_server_refuses():
    run = make_run()
    job = r.stage_job(run, 1, "build-sft", 1)
    for bad in ({"rules": [{"action": "Ignore"}]},
                {"rules": [{"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [1]}}]},
                {"rules": [{"action": "Count", "onExitCodes": {"operator": "In", "values": [0, 1]}}]},
                {"rules": [{"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [3, 1]}}]},
                {"rules": [{"action": "Count", "onExitCodes": {"operator": "In", "values": [1],
                                                               "containerName": "nope"}}]}):
        with pytest.raises(ValueError):
            validate_job({**job, "spec": {**job["spec"], "podFailurePolicy": bad}})
    with pytest.raises(ValueError, match="podReplacementPolicy"):
        validate_job({**job, "spec": {**job["spec"], "podReplacementPolicy": "TerminatingOrFailed"}})
    with pytest.raises(ValueError, match="restartPolicy"):
        validate_job({**job, "spec": {**job["spec"], "template": {"spec": {
            **job["spec"]["template"]["spec"], "restartPolicy": "OnFailure"}}}})


def test_cpu_jobs_and_the_fetch_container_request_resources():
    """BestEffort pods are the first evicted, and a namespace whose ResourceQuota requires requests refuses them."""
    run = make_run()
    for stage in ("self-instruct", "build-sft", "evaluate"):
        c = r.stage_job(run, 1, stage, 1, endpoint_url=r.endpoint(run, 0))["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
    (init,) = r.serving_deployment(run, 1, 1)["spec"]["template"]["spec"]["initContainers"]
    assert init["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    mine = make_run(spec(cpuJobs={"resources": {"requests": {"cpu": "250m", "memory": "512Mi"}}},
                         inference={"fetchResources": {"requests": {"cpu": "2"}, "limits": {"memory": "16Gi"}}}))
    c = r.stage_job(mine, 1, "build-sft", 1)["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"}}
    (init,) = r.serving_deployment(mine, 1, 1)["spec"]["template"]["spec"]["initContainers"]
    assert init["resources"] == {"requests": {"cpu": "2"}, "limits": {"memory": "16Gi"}}


def test_node_selector_and_tolerations_per_role():
    gpu = {"nvidia.com/gpu.product": "H100"}
    taint = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    run = make_run(spec(scheduling={"nodeSelector": gpu, "tolerations": taint},
                        cpuJobs={"nodeSelector": {"pool": "cpu"}, "tolerations": []},
                        training={"nodeSelector": {"pool": "train"}}))

    def pod(obj):
        return obj["spec"]["template"]["spec"]

    cpu = pod(r.stage_job(run, 1, "respond", 1, endpoint_url=r.endpoint(run, 0)))
    assert cpu["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in cpu  # not pinned to the GPU nodes
    train = pod(r.training_job(run, 1, "train-generator", 1))
    assert train["nodeSelector"] == {"pool": "train"} and train["tolerations"] == taint  # unset: scheduling's
    serve = pod(r.serving_deployment(run, 0, 1))
    assert serve["nodeSelector"] == gpu and serve["tolerations"] == taint
    # none set: every role takes scheduling's (as before)
    plain = make_run(spec(scheduling={"nodeSelector": gpu}))
    assert pod(r.stage_job(plain, 1, "build-sft", 1))["nodeSelector"] == gpu
    from selflengthen.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="cpuJobs.tolerations.0"):
        make_run(spec(cpuJobs={"tolerations": [{"operator": "Exists", "value": "x"}]}))


def test_vllm_batches_both_adapters_and_serves_the_largest_rank():
    run = make_run()
    args = r.serving_deployment(run, 1, 1)["spec"]["template"]["spec"]["containers"][0]["command"]
    i = args.index("--lora-modules")
    served = [a for a in args[i + 1:] if "=" in a and not a.startswith("--")]
    assert args[args.index("--max-loras") + 1] == str(len(served)) == "2"  # vLLM's default 1: one per batch
    from selflengthen.pipeline.serving import vllm_command

    local = vllm_command("m", port=1, served_names=["base"], lora_modules={"generator": "g", "extender": "e"})
    assert local[local.index("--max-loras") + 1] == "2"  # the local runner's server too
    top = make_run(spec(training={"lora": {"rank": 512, "alpha": 512}}))
    args = r.serving_deployment(top, 1, 1)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[args.index("--max-lora-rank") + 1] == "512" == str(max(r.VLLM_LORA_RANKS))
    from selflengthen.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="training.lora.rank"):
        make_run(spec(training={"lora": {"rank": 513}}))
    with pytest.raises(ConfigError, match="inference.extraArgs"):
        make_run(spec(inference={"extraArgs": ["--max-loras=4"]}))


def _le(model, field: str) -> int:
    return next(m.le for m in model.model_fields[field].metadata if hasattr(m, "le"))


def test_pod_hostnames_fit_a_dns_label_for_every_allowed_value():
    """The longest run name, the last iteration, the longest stage, the last attempt and the last node index."""
    from selflengthen.operator.spec import Retry, TrainingJobs
    from selflengthen.pipeline.config import RunConfig

    iterations, attempts, nodes = _le(RunConfig, "iterations"), _le(Retry, "max_attempts"), _le(TrainingJobs, "nodes")
    run = make_run(spec(iterations=iterations, training={"nodes": nodes}), name="r" * MAX_RUN_NAME)
    for stage in ALL_STAGES:
        name = r.job_name(run.name, iterations, stage, attempts)
        assert len(f"{name}-{nodes - 1}") <= 63, name
    job = r.training_job(run, iterations, "train-generator", attempts)
    assert len(f"{job['metadata']['name']}-{job['spec']['completions'] - 1}") == 63  # the bound is tight


def test_the_cache_claims_access_mode_is_documented_where_the_operator_cannot_see_it():
    from selflengthen.operator.crd import crd

    props = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert "ReadWriteMany" in props["inference"]["properties"]["modelCacheClaim"]["description"]


def test_with_a_cache_claim_vllm_pods_seed_and_publish_the_compile_cache_on_it():
    run = make_run(spec(inference={"modelCacheClaim": "hf-cache", "replicas": 8}))
    key = {}
    for model in (0, 1, 2):
        pod = r.serving_deployment(run, model, 1)["spec"]["template"]["spec"]
        vllm = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in vllm["env"]}
        # every compile cache in the pod's own directory, not in /tmp (lost) nor straight on the claim (raced)
        assert env["VLLM_CACHE_ROOT"] == "/compile-cache/vllm"
        assert env["TORCHINDUCTOR_CACHE_DIR"] == "/compile-cache/inductor"
        assert env["TRITON_CACHE_DIR"] == "/compile-cache/triton"
        assert env["HF_HOME"] == "/cache/huggingface"  # the model itself from the claim: downloaded once
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["hf-cache"] == {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}}
        assert volumes["compile-cache"] == {"name": "compile-cache", "emptyDir": {}}
        mounts = {m["name"]: m["mountPath"] for m in vllm["volumeMounts"]}
        assert mounts["compile-cache"] == "/compile-cache" and mounts["hf-cache"] == "/cache/huggingface"
        init = {c["name"]: c for c in pod["initContainers"]}
        names = [c["name"] for c in pod["initContainers"]]
        assert names[-2:] == ["seed-compile-cache", "publish-compile-cache"]  # after fetch-models (model > 0)
        seed, publish = init["seed-compile-cache"], init["publish-compile-cache"]
        assert "restartPolicy" not in seed and publish["restartPolicy"] == "Always"  # a native sidecar
        for c in (seed, publish):
            assert c["command"][:3] == ["python", "-m", "selflengthen.operator.compile_cache"]
            assert c["image"] == run.cluster.image
            shared = c["command"][c["command"].index("--shared") + 1]
            assert shared.startswith("/cache/huggingface/selflengthen-compile-cache/")
            assert c["command"][c["command"].index("--local") + 1] == "/compile-cache"
            assert {m["name"] for m in c["volumeMounts"]} >= {"hf-cache", "compile-cache"}
        assert publish["command"][publish["command"].index("--health-url") + 1] == "http://127.0.0.1:8000/health"
        key[model] = shared
    # one snapshot series per thing vLLM compiles: the base model apart from the adapters, every iteration's
    # adapters (the same arguments) the same series
    assert key[0] != key[1] and key[1] == key[2]
    other = make_run(spec(inference={"modelCacheClaim": "hf-cache", "maxModelLen": 8192}))
    pod = r.serving_deployment(other, 1, 1)["spec"]["template"]["spec"]
    seed = next(c for c in pod["initContainers"] if c["name"] == "seed-compile-cache")
    assert seed["command"][seed["command"].index("--shared") + 1] != key[1]


def test_without_a_cache_claim_no_compile_cache_containers():
    pod = r.serving_deployment(make_run(), 1, 1)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-models"]
    assert "VLLM_CACHE_ROOT" not in {e["name"] for e in pod["containers"][0]["env"]}


def test_compile_cache_snapshots_seed_publish_and_concurrent_publishers(tmp_path):
    from selflengthen.operator import compile_cache as cc

    shared = tmp_path / "claim" / "key"
    first = tmp_path / "pod-a"
    assert cc.seed(shared, first) == 0  # nothing yet: a cold compile
    assert cc.publish(shared, first, pod="a", now=1) is None  # vLLM compiled nothing: nothing to publish
    (first / "vllm" / "torch_compile_cache" / "h1" / "rank_0_0").mkdir(parents=True)
    (first / "vllm" / "torch_compile_cache" / "h1" / "rank_0_0" / "graph.py").write_text("g1")
    (first / "triton" / "k1").mkdir(parents=True)
    (first / "triton" / "k1" / "kernel.cubin").write_text("k1")
    assert cc.publish(shared, first, pod="a", now=1) == "000000000001-a"
    assert (shared / "LATEST").read_text() == "000000000001-a"
    # the next iteration's pods start from it and, having compiled nothing new, publish nothing
    for pod in ("b", "c"):
        local = tmp_path / f"pod-{pod}"
        assert cc.seed(shared, local) == 2
        assert (local / "triton" / "k1" / "kernel.cubin").read_text() == "k1"
        assert cc.publish(shared, local, pod=pod, now=2) is None
    # two pods that both compiled something new: each publishes a complete snapshot, the last one wins
    for pod, now in (("b", 3), ("c", 4)):
        local = tmp_path / f"pod-{pod}"
        (local / "triton" / f"k-{pod}").mkdir()
        (local / "triton" / f"k-{pod}" / "kernel.cubin").write_text(pod)
        assert cc.publish(shared, local, pod=pod, now=now, keep=2) == f"{now:012d}-{pod}"
    assert (shared / "LATEST").read_text() == "000000000004-c"
    snaps = sorted(p.name for p in (shared / "snapshots").iterdir())
    assert snaps == ["000000000003-b", "000000000004-c"]  # older ones pruned, no temporary left
    fresh = tmp_path / "pod-d"
    assert cc.seed(shared, fresh) == 3
    assert not (fresh / "triton" / "k-b").exists()  # one pod's consistent tree, never a mix
    # a broken pointer is a cold start, not an error
    (shared / "LATEST").write_text("../../etc")
    assert cc.latest(shared) is None and cc.seed(shared, tmp_path / "pod-e") == 0
    assert cc.main(["seed", "--shared", str(tmp_path / "nowhere"), "--local", str(tmp_path / "pod-f")]) == 0


def test_the_serving_service_is_headless_when_the_client_balances_per_request():
    from kube_admission import child_errors

    plain = r.serving_service(make_run(), 1)
    assert "clusterIP" not in plain["spec"]  # a virtual IP, balanced per connection
    run = make_run(spec(client={"balancePerRequest": True, "adaptiveConcurrency": True}))
    svc = r.serving_service(run, 1)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"]["selflengthen.io/model"] == "1"
    assert child_errors(svc) == []
    kubernetes_validate.validate(svc, K8S, strict=True)
    # the Jobs still name the Service: its name now resolves to every ready vLLM pod
    assert r.endpoint(run, 1) == "http://demo-m01-vllm.ml.svc:8000/v1"
