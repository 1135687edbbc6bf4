"""The Kubernetes manifests (k8s/) and the image (Dockerfile).

Each kustomization, and components combined as docs/kubernetes.md shows, is rendered with
``kubectl kustomize``, validated against KubeRay's CRDs and Kubernetes' own schemas and held to
the named rules of the house; each check also fails on a broken copy of the source manifests
(MUTATIONS). The product's own planner (fiqa.cluster.resources) judges the cluster asked for.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator, oas30_format_checker

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUBERAY_SCHEMAS = REPO.parent / "shared/k8s-schemas/kuberay-v1.7.0"  # beside the checkout
KUBECTL = shutil.which("kubectl")
CONFIG_DIR = "/etc/fiqa"  # where the RayJobs mount the fiqa config
RAY_VERSION = re.search(r"^ray==(\S+)$", (REPO / "requirements.lock").read_text(), re.M)[1]
KUSTOMIZATIONS = [  # not the Components: they render only on top of a kustomization
    p.parent.relative_to(K8S).as_posix()
    for p in sorted(K8S.rglob("kustomization.yaml"))
    if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == "Kustomization"
]
# BASE+COMPONENT...: components on a kustomization, as a user's own would combine them.
COMBOS = ["overlays/gpu+aws-iam-role+gcs-fault-tolerance", "base+gcs-fault-tolerance"]
RENDERED = [*KUSTOMIZATIONS, *COMBOS, "stages/train-teacher+gpu-nodes"]


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    base, *parts = target.split("+")
    with tempfile.TemporaryDirectory() as tmp:  # kustomize takes these by relative path only
        rel = [os.path.relpath(K8S / p, tmp) for p in [base, *(f"components/{c}" for c in parts)]]
        doc = {"resources": rel[:1], "components": rel[1:]}
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(doc))
        out = subprocess.run([KUBECTL, "kustomize", tmp], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {target}:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def documents(target: str) -> list[dict]:
    """A fresh copy of ``target`` rendered, or of the manifests kustomizations list ("raw")."""
    if target == "raw":
        ks = [(k.parent, yaml.safe_load(k.read_text())) for k in K8S.rglob("kustomization.yaml")]
        files = {(d / r).resolve() for d, k in ks for r in k.get("resources", [])}
        return [x for f in sorted(files) if f.is_file() for x in yaml.safe_load_all(f.open()) if x]
    if KUBECTL is None:
        pytest.skip("kubectl not found: rendered kustomizations are not checked")
    return copy.deepcopy(list(_render(target)))


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _c(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first


def groups(doc: dict) -> list[tuple[int, dict]]:
    """(pods at the autoscaler's ceiling, group) of a RayJob's head and worker groups."""
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else {}
    workers = [(g["maxReplicas"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(1, cluster["headGroupSpec"]), *workers] if cluster else []


def containers(doc: dict) -> Iterator[tuple[str, dict, dict, bool]]:
    """(where, container, its pod spec, whether Ray runs in it), KubeRay's autoscaler too."""
    spec, name = doc.get("spec", {}), f"{doc['kind']}/{doc['metadata']['name']}"
    pods = [(g.get("groupName", "head"), g["template"]["spec"], True) for _, g in groups(doc)]
    pods += [(k, spec[k]["spec"], False) for k in ("submitterPodTemplate", "template") if k in spec]
    for where, pod, ray in pods:
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{name} {where} {c['name']}", c, pod, ray and c is pod["containers"][0]
    if spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling"):  # a sidecar of the head
        head, options = pods[0][1], spec["rayClusterSpec"].get("autoscalerOptions", {})
        yield f"{name} autoscaler", {"image": head["containers"][0]["image"], **options}, head, 0


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "16Gi", 2) as a number; the schemas check its syntax."""
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "Mi": 2**20, "Gi": 2**30}[unit]


def _items(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) in a document, nested ones too; an env var {name: K, value: V} and
    a K: {value: V} (Redis' password) count as K: V."""
    if isinstance(node, dict):
        yield from [(node["name"], node["value"])] if {"name", "value"} <= node.keys() else []
        for k, v in node.items():
            yield str(k), v["value"] if isinstance(v, dict) and "value" in v else v
            yield from _items(v)
    for v in node if isinstance(node, list) else []:
        yield from _items(v)


# ------------------------------------------------------------------ the checks


def _strict(node: Any) -> Any:
    """A CRD schema that rejects unknown fields, as `kubectl apply` (strict) does."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def _list_type(validator: Any, kind: str, items: list, schema: dict) -> Iterator[Exception]:
    """The API server refuses duplicate keys in a list-type map (containers by name...)."""
    keys = schema.get("x-kubernetes-list-map-keys", [])
    ids = [json.dumps([i.get(k) for k in keys] if kind == "map" else i) for i in items]
    for dup in sorted({i for i in ids if ids.count(i) > 1} if kind in ("map", "set") else ()):
        yield jsonschema.ValidationError(f"duplicate {dup} in a list-type {kind}")


@functools.cache
def _crd(kind: str) -> Any:
    """KubeRay's CRD: an OpenAPI 3.0 schema (nullable, int32...) with Kubernetes' list types."""
    text = (KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text()
    crd = yaml.load(text, Loader=yaml.CSafeLoader)  # megabytes of YAML
    (schema,) = [
        v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == "v1"
    ]
    validator = jsonschema.validators.extend(OAS30Validator, {"x-kubernetes-list-type": _list_type})
    return validator(_strict(schema), format_checker=oas30_format_checker)


@functools.cache  # by the document's JSON: the mutation tests revalidate the same documents
def _schema_errors(text: str) -> tuple[str, ...]:
    doc = json.loads(text)
    if doc["apiVersion"].startswith("ray.io/"):
        return tuple(f"{e.json_path}: {e.message}" for e in _crd(doc["kind"]).iter_errors(doc))
    try:
        kubernetes_validate.validate(doc, "1.31.0", strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
        return (f"{getattr(e, 'json_path', '')}: {e.message}",)
    return ()


_PINNED = re.compile(r"(@sha256:\w{64}|:(?!latest$)[^/:@]+)$")  # a tag but latest, or a digest
_CREDENTIAL = re.compile(r"secret|password|passwd|token|access_?key|credential", re.I)
AWS_KEY = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b|(?i:aws_secret_access_key\s*[=:]\s*\S{40})")
MUST_SET = re.compile(r"CHANGE_ME_[A-Z0-9_]+")  # what a user sets: invalid until set, documented
_REAL = re.compile(r"\b(111122223333|123456789012|my-bucket|PROJECT_ID)\b|\.example\b|example\.com")
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?")  # at most 47 characters
_IDLE_HEAD = {"num-cpus": "0", "dashboard-host": "0.0.0.0"}


def _rules(doc: dict) -> Iterator[tuple[str, str, Any]]:
    """(rule, where, whether it holds) for each rule of the house, by name."""
    name, text = f"{doc['kind']}/{doc['metadata']['name']}", json.dumps(doc)
    config = doc["kind"] == "ConfigMap"  # the fiqa config, as fiqa reads it
    items = list(_items({k: yaml.safe_load(v) for k, v in doc["data"].items()} if config else doc))
    refs = [v for k, v in items if k in ("secretRef", "secretKeyRef")]
    literal = [k for k, v in items if isinstance(v, str) and v and _CREDENTIAL.search(k)]
    checks = {
        "no Secret or AWS key": doc["kind"] != "Secret" and not AWS_KEY.search(text),
        "no literal credential": not literal,
        # An optional Secret lets the pods start, and the job fail at its first bucket access.
        "required Secrets": not [r for r in refs if r.get("optional")],
        # A user sets CHANGE_ME_...: no real-looking placeholder that would half work.
        "no real-looking placeholder": not _REAL.search(text),
    }
    yield from ((rule, name, ok) for rule, ok in checks.items())
    for where, c, pod, ray in containers(doc):
        sc = pod.get("securityContext", {}) | c.get("securityContext", {})  # the pod's defaults
        escalates = sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged")
        res = {p: {k: quantity(v) for k, v in q.items()} for p, q in c.get("resources", {}).items()}
        req, lim = res.get("requests", {}), res.get("limits", {})
        mount = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}.get("/dev/shm")
        shm = next((v["emptyDir"] for v in pod.get("volumes", []) if v["name"] == mount), {})
        share = quantity(shm.get("sizeLimit", 0)) / lim.get("memory", 1)  # of the memory limit
        checks = {
            "pinned image": _PINNED.search(c["image"]),
            # Ray sizes itself from the limits; requests == limits keeps what it counts on.
            "limits equal requests": {"cpu", "memory"} <= lim.keys() and req == lim,
            # A numeric uid: the kubelet can verify runAsNonRoot with it.
            "non-root": sc.get("runAsNonRoot") is True and sc.get("runAsUser") not in (None, 0),
            "no privileges": not escalates,
            "no capabilities": sc.get("capabilities") == {"drop": ["ALL"]},
            "seccomp": sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"),
            # Ray's object store takes 30% of memory; the runtime's 64 MiB would spill it to disk.
            "/dev/shm in memory": not ray or shm.get("medium") == "Memory" and 0.3 <= share <= 0.5,
        }
        yield from ((rule, where, ok) for rule, ok in checks.items())
    if doc["kind"] != "RayJob":
        return
    spec, cluster = doc["spec"], doc["spec"]["rayClusterSpec"]
    head, workers = cluster["headGroupSpec"], cluster.get("workerGroupSpecs", [])
    params = head["rayStartParams"]
    ft, autoscaler = cluster.get("gcsFaultToleranceOptions"), cluster.get("autoscalerOptions", {})
    backoff = [spec.get("backoffLimit"), spec.get("submitterConfig", {}).get("backoffLimit")]
    gpu = next((_c(g)["resources"] for g in workers if g["groupName"] == "gpu"), {})
    gpus = [quantity(r.get("nvidia.com/gpu", 0)) for r in gpu.values()]
    bounded = [g.get("minReplicas", 0) <= g.get("replicas", 0) <= g["maxReplicas"] for g in workers]
    images = {c["image"] for _, c, _, _ in containers(doc) if re.search(r"(^|/)fiqa:", c["image"])}
    restarts = {g["template"]["spec"].get("restartPolicy", "Never") for g in [head, *workers]}
    wanted = json.loads(spec.get("entrypointResources", "{}")).keys()
    hosts = [g for g in workers if wanted and wanted <= g.get("resources", {}).keys()]
    mounts = [{m["mountPath"] for m in _c(g).get("volumeMounts", [])} for g in hosts]
    checks = {
        # KubeRay names the RayCluster after the RayJob plus 6 characters, its Services 53 at most.
        "a name KubeRay takes": _DNS1035.fullmatch(doc["metadata"]["name"]),
        "cleans up": spec.get("shutdownAfterJobFinishes") is True,
        "times out": spec.get("activeDeadlineSeconds", 0) > 0,
        "retries": all(isinstance(b, int) for b in backoff),
        "our own submitter pod": "submitterPodTemplate" in spec,  # non-root, pinned like the rest
        "the Ray of requirements.lock": cluster.get("rayVersion") == RAY_VERSION,
        # The head runs the GCS and the driver, no tasks; its dashboard serves the submitter.
        "the head runs no work": params == params | _IDLE_HEAD,
        "autoscaling": cluster.get("enableInTreeAutoscaling") is True,
        "replicas in bounds": all(bounded),
        "the gpu group has GPUs": min(gpus, default=1) >= 1,
        # KubeRay refuses autoscaler v2 with pods that restart.
        "v2 pods never restart": autoscaler.get("version") != "v2" or restarts == {"Never"},
        # The `images:` transformer reached every container that runs the project.
        "one project image": len(images) == 1,
        # GCS fault tolerance: the state in Redis, and the driver on a worker group that always
        # has a pod and the config, so that a lost head takes neither.
        "GCS state in Redis": not ft or ft.get("redisAddress") and "redis-password" not in params,
        "the driver off the head": not ft or hosts and all(CONFIG_DIR in m for m in mounts),
        "the driver's group keeps a pod": all(g.get("minReplicas", 0) > 0 for g in hosts),
    }
    yield from ((rule, name, ok) for rule, ok in checks.items())


def problems(docs: list[dict]) -> dict[str, list[str]]:
    """What is wrong with ``docs``, by the name of the check that says so."""
    found: dict[str, list[str]] = {}
    for doc in docs:
        kuberay = doc["apiVersion"].startswith("ray.io/")
        errors = () if kuberay and not KUBERAY_SCHEMAS.is_dir() else _schema_errors(json.dumps(doc))
        found.setdefault("KubeRay schema" if kuberay else "Kubernetes schema", []).extend(errors)
        for rule, where, ok in [] if errors else _rules(doc):  # the rules read valid documents
            found.setdefault(rule, []).extend([] if ok else [where])
    return {check: found for check, found in found.items() if found}


def _skip_without_crds() -> None:
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"no KubeRay CRD schemas in {KUBERAY_SCHEMAS}: RayJobs are not validated")


@pytest.mark.parametrize("target", RENDERED)
def test_manifests_pass_every_check(target: str) -> None:
    assert not problems(documents(target))
    _skip_without_crds()  # after the rest passed


# ------------------------------------------------------------------ broken manifests


def parts(docs: list[dict]) -> NS:
    """The raw manifests (``docs``) and the parts of them that MUTATIONS break."""
    kind = {d["kind"]: d for d in docs}
    spec = kind["RayJob"]["spec"]
    cluster, head = spec["rayClusterSpec"], spec["rayClusterSpec"]["headGroupSpec"]
    (cpu, gpu), minio = cluster["workerGroupSpecs"], _c(kind["Deployment"]["spec"])
    p = NS(docs=docs, kind=kind, spec=spec, cluster=cluster, params=head["rayStartParams"], gpu=gpu)
    p.headpod, p.gpupod, p.minio = head["template"]["spec"], gpu["template"]["spec"], minio
    p.head, p.cpu, p.gpuc = _c(head), _c(cpu), _c(gpu)
    p.gpusc = p.gpuc["securityContext"]
    p.submitter, p.sa = spec["submitterPodTemplate"]["spec"], kind["ServiceAccount"]["metadata"]
    return p


def gcs_ft(p: NS) -> dict:
    """The raw RayJob set up for GCS fault tolerance as the component does; its options."""
    p.spec["entrypointResources"] = '{"fiqa-driver": 1}'
    p.cluster["workerGroupSpecs"][0]["resources"] = {"fiqa-driver": "1"}
    p.cpu["volumeMounts"].append({"name": "fiqa-config", "mountPath": CONFIG_DIR})
    password = {"valueFrom": {"secretKeyRef": {"name": "fiqa-redis", "key": "password"}}}
    ft = {"redisAddress": "r:6379", "redisPassword": password}
    p.cluster["gcsFaultToleranceOptions"] = ft
    return ft


_SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}
_CONFIG = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
_CONFIG["data"] = {"config.yaml": "storage: {secret_access_key: x}"}
_ROLE = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/fiqa"}
_ENV = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]
MUTATIONS: list[tuple[str, Any]] = [  # (a check, how to break it)
    ("KubeRay schema", lambda p: p.spec.update(shutdownAfterJobFinishes="yes")),
    ("KubeRay schema", lambda p: p.spec.update(shutdownAfterJobFinish=True)),  # unknown field
    ("KubeRay schema", lambda p: p.gpu.update(maxReplicas="4")),
    ("KubeRay schema", lambda p: p.gpu.pop("groupName")),
    ("KubeRay schema", lambda p: p.head["resources"]["limits"].update(cpu="4 cores")),
    ("KubeRay schema", lambda p: p.spec.update(activeDeadlineSeconds=2**40)),  # over int32
    ("KubeRay schema", lambda p: p.headpod["containers"].append(p.head)),  # twice the name
    ("KubeRay schema", lambda p: p.cluster["autoscalerOptions"].update(version="v3")),
    ("Kubernetes schema", lambda p: p.kind["Deployment"]["spec"].update(replicas="1")),
    ("Kubernetes schema", lambda p: p.minio.update(cpu="1")),  # an unknown field
    ("Kubernetes schema", lambda p: p.kind["Service"]["spec"]["ports"][0].update(port=[9000])),
    ("Kubernetes schema", lambda p: p.kind["ServiceAccount"].update(spec={})),
    ("pinned image", lambda p: p.head.update(image="fiqa:latest")),
    ("pinned image", lambda p: p.minio.update(image="quay.io/minio/minio")),
    ("pinned image", lambda p: p.cpu.update(image="registry:5000/fiqa")),
    ("limits equal requests", lambda p: p.cpu["resources"].pop("limits")),
    ("limits equal requests", lambda p: p.cpu["resources"]["requests"].update(cpu="2")),
    ("limits equal requests", lambda p: p.cluster["autoscalerOptions"].pop("resources")),
    ("non-root", lambda p: p.gpuc["securityContext"].update(runAsNonRoot=False)),
    (
        "non-root",
        lambda p: p.gpupod["securityContext"].pop("runAsNonRoot") and p.gpusc.pop("runAsNonRoot"),
    ),
    ("non-root", lambda p: p.head["securityContext"].update(runAsUser=0)),
    ("no privileges", lambda p: p.minio["securityContext"].pop("allowPrivilegeEscalation")),
    ("no capabilities", lambda p: p.cpu["securityContext"].update(capabilities={"drop": []})),
    ("seccomp", lambda p: p.submitter["securityContext"].pop("seccompProfile")),
    ("/dev/shm in memory", lambda p: p.cpu.pop("volumeMounts")),
    ("/dev/shm in memory", lambda p: p.gpupod["volumes"][0]["emptyDir"].update(sizeLimit="64Mi")),
    ("no Secret or AWS key", lambda p: p.docs.append(_SECRET)),
    ("no Secret or AWS key", lambda p: p.sa.update(annotations={"a": "AKIA" + "A" * 16})),
    ("no literal credential", lambda p: p.head.update(env=_ENV)),
    ("no literal credential", lambda p: p.docs.append(_CONFIG)),
    ("no literal credential", lambda p: gcs_ft(p).update(redisPassword={"value": "x"})),
    ("required Secrets", lambda p: p.head["envFrom"][0]["secretRef"].update(optional=True)),
    ("no real-looking placeholder", lambda p: p.sa.update(annotations=_ROLE)),
    ("no real-looking placeholder", lambda p: p.head.update(image="registry.example.com/fiqa:1")),
    ("a name KubeRay takes", lambda p: p.kind["RayJob"]["metadata"].update(name="f" + "x" * 47)),
    ("a name KubeRay takes", lambda p: p.kind["RayJob"]["metadata"].update(name="1-fiqa")),
    ("cleans up", lambda p: p.spec.update(shutdownAfterJobFinishes=False)),
    ("times out", lambda p: p.spec.pop("activeDeadlineSeconds")),
    ("retries", lambda p: p.spec.pop("submitterConfig")),
    ("our own submitter pod", lambda p: p.spec.pop("submitterPodTemplate")),
    ("the Ray of requirements.lock", lambda p: p.cluster.update(rayVersion="2.9.0")),
    ("the head runs no work", lambda p: p.params.update({"num-cpus": "4"})),
    ("autoscaling", lambda p: p.cluster.update(enableInTreeAutoscaling=False)),
    ("replicas in bounds", lambda p: p.gpu.update(replicas=100)),
    ("the gpu group has GPUs", lambda p: p.gpuc["resources"]["requests"].pop("nvidia.com/gpu")),
    ("v2 pods never restart", lambda p: p.gpupod.update(restartPolicy="Always")),
    ("one project image", lambda p: p.cpu.update(image="fiqa:0.0.9")),
    ("GCS state in Redis", lambda p: gcs_ft(p) and p.params.update({"redis-password": "x"})),
    ("the driver off the head", lambda p: gcs_ft(p) and p.spec.pop("entrypointResources")),
    ("the driver off the head", lambda p: gcs_ft(p) and p.cpu.pop("volumeMounts")),
    (
        "the driver's group keeps a pod",
        lambda p: gcs_ft(p) and p.cluster["workerGroupSpecs"][0].update(minReplicas=0),
    ),
]


@pytest.mark.parametrize(
    "check, mutate", MUTATIONS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(MUTATIONS)]
)
def test_each_check_fails_on_its_broken_manifest(check: str, mutate: Any) -> None:
    if check == "KubeRay schema":
        _skip_without_crds()
    assert check not in problems(documents("raw"))
    mutate(broken := parts(documents("raw")))
    assert check in problems(broken.docs), "it passed the broken manifest"


def test_every_check_has_a_broken_manifest_and_gcs_ft_as_set_up_passes() -> None:
    rules = {rule for doc in documents("raw") for rule, _, _ in _rules(doc)}
    assert {c for c, _ in MUTATIONS} == rules | {"KubeRay schema", "Kubernetes schema"}
    gcs_ft(p := parts(documents("raw")))
    assert not problems(p.docs)


# ------------------------------------------------------------------ what the RayJobs run


def _config(docs: list[dict]) -> tuple[dict, Any]:
    """The fiqa config the RayJob mounts, and its entrypoint's arguments."""
    from fiqa.cli import build_parser

    job = _one(docs, "RayJob")
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    refs = {v["name"] for k, v in _items(job) if k == "configMap"}  # kustomize hashes the name
    assert refs and refs <= maps.keys() and Path(args.config).parent.as_posix() == CONFIG_DIR
    return yaml.safe_load(maps[refs.pop()][Path(args.config).name]), args


def misfits(raw: dict, job: dict, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the product's planner refuses or warns about on the RayJob's cluster at its
    ceiling, and paths that are not in a bucket (the pods share no disk)."""
    import ray

    from fiqa.cluster import local, resources
    from fiqa.config import ConfigError, from_dict

    strings = [v for _, v in _items(raw) if isinstance(v, str)]
    found = [v for v in strings if "/" in v and not re.match(r"(s3|https?)://", v)]
    ray_cfg = raw.get("ray") or {}  # inside the RayJob the driver joins the job's cluster
    found += [f"ray.{k}: {ray_cfg[k]}" for k in ("address", "num_cpus") if ray_cfg.get(k)]
    pods = [(n, g["rayStartParams"], _c(g)["resources"]["limits"]) for n, g in groups(job)]
    # Ray's CPUs and GPUs of a pod: its rayStartParams, else its limits.
    cpus = sum(n * quantity(p.get("num-cpus", lim["cpu"])) for n, p, lim in pods)
    gpus = sum(n * quantity(p.get("num-gpus", lim.get("nvidia.com/gpu", 0))) for n, p, lim in pods)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus, "GPU": gpus})
    monkeypatch.setattr(local, "_may_grow", False)  # at its ceiling the cluster grows no more
    monkeypatch.setattr(resources.log, "warning", lambda msg, *args: found.append(msg % args))
    cfg = from_dict(raw)
    training = (cfg.train_teacher, cfg.train_teacher_plus, cfg.distill_student)
    plans = [functools.partial(resources.check_training, t) for t in training]
    for plan in [functools.partial(resources.plan_scoring, cfg.scoring, with_model=True), *plans]:
        try:
            plan()
        except ConfigError as e:
            found.append(str(e))
    return found


@pytest.mark.parametrize("target", RENDERED)
def test_the_cluster_fits_the_config(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = documents(target)
    assert not misfits(_config(docs)[0], _one(docs, "RayJob"), monkeypatch)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda job, config: job["spec"]["rayClusterSpec"]["workerGroupSpecs"].pop(),
        lambda job, config: config["train_teacher"].update(cpus_per_worker=64),
        lambda job, config: config.update(run_dir="runs/paper"),
    ],
    ids=["no GPU group", "workers bigger than the cluster", "run_dir on a local disk"],
)
def test_the_planner_refuses_what_the_cluster_cannot_run(mutate: Any, monkeypatch: Any) -> None:
    job = _one(documents("raw"), "RayJob")
    config = yaml.safe_load((K8S / "base/fiqa-config.yaml").read_text())
    assert not misfits(config, job, monkeypatch)
    mutate(job, config)
    assert misfits(config, job, monkeypatch)


def test_each_rayjob_runs_fiqa_and_each_stage_has_one() -> None:
    from fiqa.pipelines import STAGE_NAMES

    stages = []
    for target in KUSTOMIZATIONS:
        docs = documents(target)
        args, name = _config(docs)[1], _one(docs, "RayJob")["metadata"]["name"]
        assert args.command == ("stage" if target.startswith("stages/") else "run"), target
        if args.command == "stage":
            assert name == "fiqa-" + args.name.replace("_", "-"), target
            stages.append(args.name)
    assert sorted(stages) == sorted(STAGE_NAMES)


def test_overlays_and_components_do_what_they_say() -> None:
    docs = documents("overlays/local")  # CPU only, on its MinIO
    url, service = _config(docs)[0]["storage"]["endpoint_url"], _one(docs, "Service")
    ports = service["spec"]["ports"]
    assert url in [f"http://{service['metadata']['name']}:{p['port']}" for p in ports]
    labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert "nvidia.com/gpu" not in json.dumps(docs)
    taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for target in ("overlays/gpu", "stages/train-teacher+gpu-nodes"):  # GPU nodes, GPU pods only
        cpu, gpu = (g["template"]["spec"] for _, g in groups(_one(documents(target), "RayJob"))[1:])
        assert gpu["nodeSelector"] and taint in gpu["tolerations"] and not cpu.get("tolerations")
    role = "overlays/gpu+aws-iam-role+gcs-fault-tolerance"  # a role instead of the Secret
    annotations = _one(documents(role), "ServiceAccount")["metadata"]["annotations"]
    assert annotations == {"eks.amazonaws.com/role-arn": "CHANGE_ME_IAM_ROLE_ARN"}
    for target, secret in (("overlays/gpu", True), (role, False)):
        nodes = [c for _, c, _, ray in containers(_one(documents(target), "RayJob")) if ray]
        assert len(nodes) == 3 and all(("envFrom" in c) == secret for c in nodes), target


def test_values_to_set_are_documented_and_patches_address_items_by_name() -> None:
    texts = {p: p.read_text() for p in K8S.rglob("*") if p.is_file()}
    assert not [p for p, t in texts.items() if AWS_KEY.search(t)], "a key in an example file"
    documented = set(MUST_SET.findall((REPO / "docs/kubernetes.md").read_text()))
    assert {m for t in texts.values() for m in MUST_SET.findall(t)} == documented
    assert not MUST_SET.search(json.dumps(documents("overlays/local"))), "local runs as it is"
    for k in K8S.rglob("kustomization.yaml"):  # an index would patch a reordered base wrongly
        for p in yaml.safe_load(k.read_text()).get("patches", []):
            ops = yaml.safe_load(p.get("patch") or (k.parent / p["path"]).read_text())
            paths = [o["path"] for o in ops] if isinstance(ops, list) else []  # JSON patches
            assert not [path for path in paths if re.search(r"/\d+(/|$)", path)], k


def test_the_image_is_the_locked_project_on_the_pinned_ray_as_uid_1000() -> None:
    text, pyproject = (REPO / "Dockerfile").read_text(), (REPO / "pyproject.toml").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-", text, re.M)
    assert args["RAY_VERSION"] == RAY_VERSION, "the image's Ray is not requirements.lock's"
    assert re.search(r"^USER 1000:", text, re.M), "numeric, so the kubelet can verify non-root"
    assert re.search(r"pip install -c \S*requirements\.lock", text) and " -e " not in text
    base = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    version = re.search(r'^version = "(.+)"', pyproject, re.M)[1]
    assert [i["newTag"] for i in base["images"] if i["name"] == "fiqa"] == [version]
    # .dockerignore is an allowlist: a package folder missing from it is missing from the image.
    patterns = [x for x in (REPO / ".dockerignore").read_text().splitlines() if x and x[0] != "#"]
    folders = re.findall(r'"fiqa[\w.]*" = "(\w+)"', pyproject)
    wanted = {"!pyproject.toml", "!README.md", "!requirements.lock"} | {f"!{f}/" for f in folders}
    assert patterns[0] == "*" and len(folders) >= 4 and wanted <= set(patterns)
