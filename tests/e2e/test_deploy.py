"""deploy/ as an operator uses it: the Kubernetes manifests against the Kubernetes schemas (offline),
the LeaderWorkerSet example against the fields LWS defines, the Slurm scripts run with `srun`,
`scontrol` and `torchrun` stand-ins on PATH that start the real torchrun, and the batch lines of
both schedulers run against the tiny model with the scheduler's variables faked."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLE_IMAGE, ROOT, cli_env
from wan_spmd.batch import Entry, shard_of
from wan_spmd.video import probe_mp4

KUBERNETES = ROOT / "deploy" / "kubernetes"
SLURM = ROOT / "deploy" / "slurm"
# The oldest Kubernetes the manifests claim (README); they are also checked against the newest
# schemas kubernetes-validate ships.
OLDEST_KUBERNETES = "1.30"
# Flags the manifests pass that other work is adding to wan_spmd; allowed until they exist.
PENDING_FLAGS: set[str] = set()
# The fields of leaderworkerset.x-k8s.io/v1 (LeaderWorkerSetSpec, LeaderWorkerTemplate) and the
# values the example picks from, as the LWS API defines them.
LWS_SPEC_FIELDS = {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy", "networkConfig"}
LWS_TEMPLATE_FIELDS = {
    "leaderTemplate",
    "workerTemplate",
    "size",
    "restartPolicy",
    "subGroupPolicy",
    "volumeClaimTemplates",
    "persistentVolumeClaimRetentionPolicy",
}
LWS_STARTUP_POLICIES = {"LeaderCreated", "LeaderReady"}
LWS_RESTART_POLICIES = {"RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"}
# Labels and variables the LWS controller puts on each pod of a group.
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
SCHEDULER_VARS = ("SLURM_", "JOB_COMPLETION_INDEX")
FAST = {"size": "32x32", "num_frames": 5, "num_inference_steps": 1}


# ---------------------------------------------------------------------------------------------
# Reading the manifests and their command lines


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every document of every manifest in deploy/kubernetes."""
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def torchrun_args(argv: list[str]):
    """torchrun's own parser on a command line: its options, and the program's."""
    from torch.distributed.run import get_args_parser

    try:
        return get_args_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"torchrun refuses {argv}")


def check_wan_flags(args: list[str]) -> None:
    """Every `--flag` given to a wan_spmd command names one of its options (or a pending one), as the
    CLI itself parses them (the option table's commands and make-tiny alike)."""
    import typer

    from wan_spmd.cli import app

    command = typer.main.get_command(app).commands[args[0]]
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}
    given = {arg.split("=", 1)[0] for arg in args[1:] if arg.startswith("--")}
    assert given - known <= PENDING_FLAGS, f"wan_spmd {args[0]} has no {sorted(given - known - PENDING_FLAGS)}"


def flag(args: list[str], name: str) -> str:
    """The value of `--name=value` in a manifest's args (they all use that form)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {args}"
    return values[0]


def scheduler_free_env(**extra: str) -> dict[str, str]:
    """cli_env without any scheduler's variables (the test may itself run under one), plus `extra`."""
    env = {k: v for k, v in cli_env().items() if not k.startswith(SCHEDULER_VARS)}
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, all of it killed on timeout (torchrun's ranks
    and the srun stand-in's agents included)."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


# ---------------------------------------------------------------------------------------------
# Kubernetes: schemas, offline


def test_manifests_validate_offline_against_kubernetes_schemas(monkeypatch):
    """Every Kubernetes-native document in deploy/kubernetes must pass the Kubernetes schemas
    strictly (unknown fields refused), for the oldest version the README claims and the newest
    shipped, without any network (CI has none). If this fails, `kubectl apply` would refuse a
    manifest (or silently drop a misspelled field), or the check needs a network it will not have."""
    import kubernetes_validate

    versions = kubernetes_validate.utils.all_versions()
    assert any(v.startswith(OLDEST_KUBERNETES + ".") for v in versions), (
        f"kubernetes-validate no longer ships {OLDEST_KUBERNETES} schemas; raise the version the README claims"
    )

    def no_network(*args, **kwargs):
        raise AssertionError("schema validation tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)

    checked = []
    for name, doc in manifests():
        if doc["kind"] == "LeaderWorkerSet":
            continue  # a custom resource: its own test below
        for version in (OLDEST_KUBERNETES, kubernetes_validate.utils.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)
        checked.append((name, doc["kind"]))
    assert sorted(checked) == [
        ("batch-job.yaml", "Job"),
        ("lws-two-hosts.yaml", "Service"),
        ("serve.yaml", "Deployment"),
        ("serve.yaml", "PersistentVolumeClaim"),
        ("serve.yaml", "PersistentVolumeClaim"),
        ("serve.yaml", "Service"),
    ]

    # The check can fail: a misspelled field and a wrong type are refused.
    broken = copy.deepcopy(the("Deployment"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)
    broken = copy.deepcopy(the("Job"))
    broken["spec"]["completions"] = "eight"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)


def serving_pod_checks(pod: dict[str, Any]) -> list[str]:
    """What the issue asks of a serving pod, checked on its spec: GPUs requested as many as ranks,
    the model read-only, probes on /health, a preStop, a grace longer than preStop + --stop-grace,
    the API key read from a Secret's file. Returns the torchrun command line."""
    container = pod["containers"][0]
    assert container["command"] == ["torchrun"]
    args = container["args"]
    parsed = torchrun_args(args)
    assert parsed.module and parsed.training_script == "wan_spmd" and parsed.training_script_args[0] == "serve"
    serve = parsed.training_script_args
    check_wan_flags(serve)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(parsed.nproc_per_node)
    assert flag(serve, "--host") == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["http"] == int(flag(serve, "--port"))

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    model = flag(serve, "--model")
    (models,) = [m for m in mounts.values() if model.startswith(m["mountPath"] + "/")]
    assert models["readOnly"] and volumes[models["name"]]["persistentVolumeClaim"]["readOnly"]
    key_file = Path(flag(serve, "--api-key-file"))
    (keys,) = [m for m in mounts.values() if m["mountPath"] == str(key_file.parent)]
    assert "secret" in volumes[keys["name"]] and keys["readOnly"]
    assert "--api-key" not in {a.split("=", 1)[0] for a in serve}  # never the key itself on a command line

    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + float(flag(serve, "--stop-grace"))
    return args


def test_serve_deployment_and_service():
    """The single-host replica: if this fails, the Service points at no pod or port, a probe or the
    grace period is wrong for the server's own shutdown, GPUs and ranks disagree, or a flag is one
    wan_spmd does not have."""
    deployment, service = the("Deployment"), the("Service", "wan-spmd")
    pod = deployment["spec"]["template"]
    serving_pod_checks(pod["spec"])
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_serve_replicas_share_one_job_store():
    """The replicas' --output-dir is one ReadWriteMany claim defined beside them, and no flag pins a
    replica name (each pod's own name is the default). If this fails, a poll that reaches the other
    replica gets 404, or two replicas write each other's jobs."""
    deployment, claim = the("Deployment"), the("PersistentVolumeClaim", "wan-spmd-jobs")
    pod = deployment["spec"]["template"]["spec"]
    serve = pod["containers"][0]["args"]
    assert deployment["spec"]["replicas"] >= 2
    (store,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == flag(serve, "--output-dir")]
    volume = {v["name"]: v for v in pod["volumes"]}[store["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and not store.get("readOnly")
    assert not any(a.startswith("--replica-name") for a in serve)
    text = (KUBERNETES / "serve.yaml").read_text()
    assert "no session affinity is needed" in text and "ReadWriteMany" in text


def test_serve_replicas_share_one_compile_cache():
    """--compile-cache is a writable ReadWriteMany claim of its own, apart from the job store. If this
    fails, every restart or scale-up compiles again (the cache dies with the container), or the
    cache's folders land among the job records."""
    deployment, claim = the("Deployment"), the("PersistentVolumeClaim", "wan-spmd-compile-cache")
    pod = deployment["spec"]["template"]["spec"]
    serve = pod["containers"][0]["args"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == flag(serve, "--compile-cache")]
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and not mount.get("readOnly")
    assert flag(serve, "--compile-cache") != flag(serve, "--output-dir")


def test_lws_example_names_the_fields_it_relies_on():
    """The LeaderWorkerSet is a custom resource the Kubernetes schemas do not know: it must parse,
    use only fields of leaderworkerset.x-k8s.io/v1, give torchrun --nnodes equal to the group size
    with c10d at the leader, and its pod templates must pass the Pod schema. If this fails, the
    controller would refuse it or the two agents would never meet."""
    import kubernetes_validate

    lws = the("LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    spec = lws["spec"]
    group = spec["leaderWorkerTemplate"]
    assert set(spec) <= LWS_SPEC_FIELDS and set(group) <= LWS_TEMPLATE_FIELDS
    assert spec["startupPolicy"] in LWS_STARTUP_POLICIES and group["restartPolicy"] in LWS_RESTART_POLICIES
    size = group["size"]
    assert size == 2

    commands = {}
    for role in ("leaderTemplate", "workerTemplate"):
        template = group[role]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata", {}), "spec": template["spec"]}
        kubernetes_validate.validate(pod, OLDEST_KUBERNETES, strict=True)
        container = template["spec"]["containers"][0]
        parsed = torchrun_args(container["args"])
        assert int(parsed.nnodes) == size
        assert parsed.rdzv_backend == "c10d" and parsed.rdzv_endpoint == "$(LWS_LEADER_ADDRESS):29500"
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(parsed.nproc_per_node)
        check_wan_flags(parsed.training_script_args)
        assert "--cfg-parallel" in parsed.training_script_args  # only the cfg dimension crosses hosts
        commands[role] = container["args"]
    serving_pod_checks(group["leaderTemplate"]["spec"])
    # the same program on both hosts; only the rendezvous options differ
    leader, worker = commands["leaderTemplate"], commands["workerTemplate"]
    assert leader[leader.index("-m") :] == worker[worker.index("-m") :]

    service = the("Service", "wan-spmd-2host-http")
    assert service["spec"]["selector"] == {LWS_NAME_LABEL: lws["metadata"]["name"], LWS_INDEX_LABEL: "0"}
    assert service["metadata"]["name"] != lws["metadata"]["name"]  # LWS's own headless Service has that name
    assert service["spec"]["ports"][0]["targetPort"] == 8000


# ---------------------------------------------------------------------------------------------
# Running the batch lines, with the scheduler's variables faked


def write_batch(folder: Path, ids_by_shard: dict[int, int], num_shards: int) -> tuple[Path, dict[int, list[str]]]:
    """A JSONL file with `n` lines in each named shard (explicit ids, so the shards are known)."""
    folder.mkdir(parents=True)
    (folder / "example.png").write_bytes(EXAMPLE_IMAGE.read_bytes())
    picked: dict[int, list[str]] = {k: [] for k in ids_by_shard}
    i = 0
    while any(len(picked[k]) < n for k, n in ids_by_shard.items()):
        job_id, i = f"clip{i}", i + 1
        shard = shard_of(Entry(1, job_id), num_shards)
        if shard in picked and len(picked[shard]) < ids_by_shard[shard]:
            picked[shard].append(job_id)
    lines = [
        {"id": job_id, "prompt": job_id, "image": "example.png", "seed": 1, **FAST}
        for ids in picked.values()
        for job_id in ids
    ]
    requests = folder / "requests.jsonl"
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return requests, picked


def check_shard_ran(out: Path, index: int, count: int, expected_ids: list[str]) -> None:
    """This shard's results file holds exactly its lines, each ok with its video; no other shard's."""
    results = [json.loads(x) for x in (out / f"results-{index}-of-{count}.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(expected_ids)
    assert all(r["status"] == "ok" for r in results), results
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(f"{i}.mp4" for i in expected_ids)
    assert probe_mp4(out / f"{expected_ids[0]}.mp4")["num_frames"] == FAST["num_frames"]
    assert [p.name for p in out.glob("results*.jsonl")] == [f"results-{index}-of-{count}.jsonl"]


def stand_ins(folder: Path, torchrun: str | None = None) -> Path:
    """`srun`, `scontrol` and `torchrun` for the Slurm scripts, on this machine.

    srun drops its own options and runs the command once per node of `--nodes=N` (the last node
    first, so that the leader is never the first to start), each with its SLURM_NODEID; scontrol
    names this machine as the job's one host; torchrun is the real one unless `torchrun` gives
    another script."""
    folder.mkdir()
    srun = folder / "srun"
    srun.write_text(
        f"#!{sys.executable}\n"
        "import os, subprocess, sys, time\n"
        "args, nodes = sys.argv[1:], 1\n"
        "while args and args[0].startswith('-'):\n"
        "    option = args.pop(0)\n"
        "    assert '=' in option, f'srun stand-in takes --option=value only, got {option}'\n"
        "    if option.startswith('--nodes='):\n"
        "        nodes = int(option.split('=', 1)[1])\n"
        "procs = []\n"
        "for node in reversed(range(nodes)):\n"
        "    procs.append(subprocess.Popen(args, env={**os.environ, 'SLURM_NODEID': str(node)}))\n"
        "    time.sleep(1 if node else 0)\n"
        "sys.exit(max(p.wait() for p in procs))\n"
    )
    scontrol = folder / "scontrol"
    scontrol.write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1\n')
    real_torchrun = f'#!/bin/bash\nexec "{sys.executable}" -m torch.distributed.run "$@"\n'
    (folder / "torchrun").write_text(torchrun or real_torchrun)
    for path in folder.iterdir():
        path.chmod(0o755)
    return folder


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sbatch")))
def test_slurm_scripts_parse(script: str):
    """`bash -n` on each Slurm script, and its #SBATCH lines before the first command (sbatch stops
    reading them there). If this fails, sbatch would reject the script or ignore its resources."""
    proc = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = (SLURM / script).read_text().splitlines()
    first_command = next(i for i, x in enumerate(lines) if x.strip() and not x.startswith("#"))
    assert any(x.startswith("#SBATCH --gpus-per-node=") for x in lines[:first_command])
    assert not any(x.startswith("#SBATCH") for x in lines[first_command:])


def test_slurm_array_script_runs_its_shard(tiny_i2v, tmp_path: Path):
    """The array script, run as Slurm would run task 1 of `--array=0-1`: the real torchrun and
    `wan_spmd batch` on the tiny model must take shard 1 of 2 from SLURM_ARRAY_TASK_ID and
    SLURM_ARRAY_TASK_COUNT, say so, and make exactly that shard's videos."""
    requests, picked = write_batch(tmp_path / "data", {0: 1, 1: 2}, num_shards=2)
    out = tmp_path / "data" / "out"
    bin_dir = stand_ins(tmp_path / "bin")
    env = scheduler_free_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        WAN_MODEL="tiny",
        WAN_GPUS="1",
        SLURM_JOB_ID="1001",
        SLURM_ARRAY_JOB_ID="1000",
        SLURM_ARRAY_TASK_ID="1",
        SLURM_ARRAY_TASK_COUNT="2",
        SLURM_ARRAY_TASK_MIN="0",
        SLURM_ARRAY_TASK_MAX="1",
    )
    proc = run_group(
        ["bash", str(SLURM / "batch-array.sbatch"), str(requests), str(out)], env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch: shard 1 of 2 (SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_COUNT=2)" in proc.stderr, proc.stderr[-3000:]
    assert "batch: 2 ok, 0 failed" in proc.stdout
    check_shard_ran(out, 1, 2, picked[1])


def test_indexed_job_command_runs_its_shard(tiny_i2v, tmp_path: Path):
    """The Indexed Job's container command, as written, with its paths pointed at this test's files
    and one rank: the pod with JOB_COMPLETION_INDEX=0 must take shard 0 of the manifest's
    --num-shards (which must equal its completions), say so, and make exactly that shard's videos."""
    job = the("Job")
    assert job["spec"]["completionMode"] == "Indexed"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun"]
    parsed = torchrun_args(container["args"])
    assert parsed.standalone and parsed.module and parsed.training_script == "wan_spmd"
    batch_args = parsed.training_script_args
    assert batch_args[0] == "batch" and flag(batch_args, "--shard-index") == "auto"
    num_shards = int(flag(batch_args, "--num-shards"))
    assert num_shards == job["spec"]["completions"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == int(parsed.nproc_per_node)
    check_wan_flags(batch_args)

    data = tmp_path / "data"
    requests, picked = write_batch(data, {0: 2, 3: 1}, num_shards=num_shards)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/data" in mounts and not mounts["/data"].get("readOnly")

    def here(arg: str) -> str:
        if arg.startswith("--model="):
            return "--model=tiny"
        return re.sub(r"(^|=)/data/", rf"\g<1>{data}/", arg)

    run_args = [here(a) for a in batch_args]
    assert run_args[1] == str(requests) and flag(run_args, "--output-dir") == str(data / "out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "wan_spmd"]
    proc = run_group([*cmd, *run_args], env=scheduler_free_env(JOB_COMPLETION_INDEX="0"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"batch: shard 0 of {num_shards} (JOB_COMPLETION_INDEX=0)" in proc.stderr, proc.stderr[-3000:]
    check_shard_ran(data / "out", 0, num_shards, picked[0])


def test_shard_index_auto_without_a_scheduler_is_one_line(tmp_path: Path):
    """`--shard-index auto` outside any scheduler: exit 2 with one line naming the variables, before
    torch loads, so a misconfigured job fails at once rather than running the whole batch."""
    requests, _ = write_batch(tmp_path / "data", {0: 1}, num_shards=1)
    probe = (
        "import sys; from wan_spmd.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    print('torch' in sys.modules, e.code)\n"
    )
    args = ["batch", str(requests), "--output-dir", str(tmp_path / "out"), "--shard-index", "auto"]
    proc = subprocess.run(
        [sys.executable, "-c", probe, *args, "--num-shards", "4"],
        capture_output=True,
        text=True,
        env=scheduler_free_env(),
    )
    assert proc.stdout.split() == ["False", "2"], proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "SLURM_ARRAY_TASK_ID" in proc.stderr and "JOB_COMPLETION_INDEX" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# One replica over two hosts: where rank 0 lands

# Stands in for `-m wan_spmd serve ...` (a model load would only slow the test down): each rank
# writes down which agent it runs under and its global rank.
RANK_PROBE = """import json, os, sys
out = os.path.join(os.environ["PROBE_OUT"], os.environ["AGENT"] + "-" + os.environ["LOCAL_RANK"] + ".json")
with open(out, "w") as f:
    json.dump({"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"])}, f)
"""


def ranks_by_agent(folder: Path) -> dict[str, int]:
    found = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert {v["world"] for v in found.values()} == {2}, found
    return {name.rsplit("-", 1)[0]: v["rank"] for name, v in found.items()}


def test_lws_agents_put_rank0_on_the_leader(tmp_path: Path):
    """The LWS templates' torchrun options, run as two agents on this machine (the worker started
    first, one rank each): rank 0, which serves HTTP, must land under the leader, whose pod the
    Service selects. If this fails, the Service would point at a pod where nothing listens."""
    group = the("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    port = free_port()
    probe = tmp_path / "probe.py"
    probe.write_text(RANK_PROBE)
    (tmp_path / "ranks").mkdir()
    lws_env = {"$(LWS_LEADER_ADDRESS)": "127.0.0.1", "$(LWS_WORKER_INDEX)": "1", ":29500": f":{port}"}

    procs = []
    for role in ("worker", "leader"):
        args = group[f"{role}Template"]["spec"]["containers"][0]["args"]
        program = args.index("-m")
        launcher = []
        for arg in args[:program]:
            for name, value in lws_env.items():
                arg = arg.replace(name, value)
            launcher.append("--nproc-per-node=1" if arg.startswith("--nproc-per-node=") else arg)
        assert not any("$(" in a for a in launcher), launcher
        env = scheduler_free_env(AGENT=role, PROBE_OUT=str(tmp_path / "ranks"))
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(probe)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        )
        time.sleep(1)
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:  # a hung rendezvous: end each agent with its ranks
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert ranks_by_agent(tmp_path / "ranks") == {"leader": 0, "worker": 1}


def test_slurm_two_node_script_puts_rank0_on_the_leader(tmp_path: Path):
    """The two-node Slurm script, with srun starting its two agents on this machine (node 1 first,
    one rank each) and `-m wan_spmd serve ...` swapped for a probe: torchrun must rendezvous with
    --nnodes 2 over c10d at the leader, rank 0 must land on node 0 (the host the log names), and
    the serve flags must be wan_spmd's. If this fails, the server listens where nobody looks."""
    probe = tmp_path / "probe.py"
    probe.write_text(RANK_PROBE)
    (tmp_path / "ranks").mkdir()
    record = tmp_path / "argv"
    record.mkdir()
    # torchrun as the script calls it, its command line kept, the program replaced by the probe
    torchrun = (
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "args = sys.argv[1:]\n"
        f"open(os.path.join({str(record)!r}, os.environ['SLURM_NODEID'] + '.json'), 'w').write(json.dumps(args))\n"
        "os.environ['AGENT'] = 'node' + os.environ['SLURM_NODEID']\n"
        f"launcher = [sys.executable, '-m', 'torch.distributed.run', *args[: args.index('-m')], {str(probe)!r}]\n"
        "os.execv(sys.executable, launcher)\n"
    )
    bin_dir = stand_ins(tmp_path / "bin", torchrun=torchrun)
    port = free_port()
    env = scheduler_free_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PROBE_OUT=str(tmp_path / "ranks"),
        WAN_MODEL="tiny",
        WAN_GPUS="1",
        WAN_RDZV_PORT=str(port),
        SLURM_JOB_ID="2000",
        SLURM_JOB_NODELIST="gpu[01-02]",
        SLURM_NNODES="2",
    )
    proc = run_group(["bash", str(SLURM / "serve-two-nodes.sbatch")], env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rendezvous at 127.0.0.1:{port}; the server will listen on http://127.0.0.1:8000" in proc.stderr
    assert ranks_by_agent(tmp_path / "ranks") == {"node0": 0, "node1": 1}
    for node in ("0", "1"):
        parsed = torchrun_args(json.loads((record / f"{node}.json").read_text()))
        assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend) == ("2", "1", "c10d")
        assert parsed.rdzv_endpoint == f"127.0.0.1:{port}"
        serve = parsed.training_script_args
        assert serve[0] == "serve" and "--cfg-parallel" in serve  # only the cfg dimension crosses nodes
        check_wan_flags(serve)


# ---------------------------------------------------------------------------------------------
# The image: the Dockerfile's pins against pyproject, one image name everywhere, flags that exist

DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "registry.example.com/wan-spmd:0.1.0"
# Extras the Dockerfile installs that other work is adding to pyproject; allowed until they exist.
PENDING_EXTRAS = {"hopper"}


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a Dockerfile's RUN lines or a shell script, continuations joined, split on
    `&&`, `;` and newlines, each as shlex words (comments dropped)."""
    import shlex

    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*RUN\s+", "", line)
        for part in re.split(r"&&|;|\|\|", line):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            if words:
                commands.append(words)
    return commands


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` (also `python -m pip install`) in `text`."""
    found = []
    for words in shell_commands(text):
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                found.append(words[i + 2 :])
    return found


def pins(args: list[str]) -> dict[str, str]:
    return dict(a.split("==", 1) for a in args if "==" in a and not a.startswith("-"))


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_installs_the_pinned_set_of_pyproject():
    """The Dockerfile installs exactly the pins of pyproject's `gpu` extra (the torch the benchmarks
    ran: version and CUDA build as docs/benchmarks.md states them) from the index of that CUDA
    build, on a CUDA runtime base of the same major version, then the project with its `gpu` and
    `hopper` extras; launch.sh installs the same pin on a GPU machine. If this fails, the image or a
    GPU venv runs a torch nobody measured, or an extra that pyproject does not define."""
    extras = pyproject()["project"]["optional-dependencies"]
    gpu_pins = pins(extras["gpu"])
    assert set(gpu_pins) == {"torch"}
    measured = re.findall(r"torch (\d+\.\d+\.\d+)\+cu(\d+)", (ROOT / "docs" / "benchmarks.md").read_text())
    assert measured and set(measured) == {(gpu_pins["torch"], measured[0][1])}, measured
    cuda = measured[0][1]  # "130": CUDA 13.0

    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+$", text, re.M)
    assert base and base.group(1) + base.group(2) == cuda, "the base must be CUDA's runtime image of that CUDA"
    installs = pip_installs(text)
    torch_install = [a for a in installs if "torch" in pins(a)]
    assert len(torch_install) == 1 and pins(torch_install[0]) == gpu_pins
    assert f"https://download.pytorch.org/whl/cu{cuda}" in torch_install[0]
    assert {k: v for a in installs for k, v in pins(a).items()} == gpu_pins  # nothing else pinned by hand
    (project,) = [a for a in installs if any(x.startswith(".[") for x in a)]
    wanted = set(re.fullmatch(r"\.\[(.*)\]", next(x for x in project if x.startswith(".["))).group(1).split(","))
    assert {"gpu", "hopper"} <= wanted and wanted <= set(extras) | PENDING_EXTRAS, wanted
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / copied).exists(), copied

    launch = (ROOT / "launch.sh").read_text()
    launch_torch = [a for a in pip_installs(launch) if "torch" in pins(a)]
    gpu_line = [a for a in launch_torch if f"https://download.pytorch.org/whl/cu{cuda}" in a]
    assert len(gpu_line) == 1 and pins(gpu_line[0]) == gpu_pins
    assert all("torch" in pins(a) for a in launch_torch) and not re.search(r"torch\s*>=", launch)


def test_every_deploy_file_names_the_one_image():
    """Every Kubernetes container, both Slurm scripts' default WAN_IMAGE (enroot spells the registry
    `host#image`), and the build command in the Dockerfile and README name the same image. If this
    fails, one deploy file runs an image the others do not, or one that was never built."""
    images = [c["image"] for _, doc in manifests() for c in pod_containers(doc)]
    assert len(images) == 4, images  # serve, batch, the two-host leader and worker
    named = {f"container {i}": image for i, image in enumerate(images)}
    for script in sorted(SLURM.glob("*.sbatch")):
        (default,) = re.findall(r"WAN_IMAGE:-([^}]+)\}", script.read_text())
        named[script.name] = default.replace("#", "/", 1)
        assert "--container-image=" in script.read_text() and "WAN_VENV" in script.read_text()
    for doc in (DOCKERFILE, ROOT / "README.md"):
        for tag in re.findall(r"docker build -t (\S+) \.", doc.read_text()):
            named[f"{doc.name} (docker build)"] = tag
    assert f"{DOCKERFILE.name} (docker build)" in named and "README.md (docker build)" in named
    assert set(named.values()) == {IMAGE}, named


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a manifest document's pod templates (Deployment, Job, LeaderWorkerSet)."""
    spec = doc.get("spec", {})
    templates = [spec.get("template")]
    group = spec.get("leaderWorkerTemplate", {})
    templates += [group.get("leaderTemplate"), group.get("workerTemplate")]
    return [c for t in templates if t for c in t["spec"]["containers"]]


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sbatch")))
def test_slurm_scripts_pass_only_wan_spmd_flags(script: str):
    """Every `-m wan_spmd COMMAND ...` in a Slurm script, parsed as the shell would, passes only
    options that command has. If this fails, the job starts, loads nothing and exits 2."""
    import shlex

    text = re.sub(r"\\\n", " ", (SLURM / script).read_text())
    found = re.findall(r"-m wan_spmd (\w+)([^\n']*)", text)
    assert found
    for command, rest in found:
        check_wan_flags([command, *shlex.split(rest)])


def test_kubectl_reads_the_manifests():
    """kubectl's own decoder on each manifest, where kubectl is installed: `kubectl label --local`
    parses every document with kubectl's built-in types and needs no cluster (`kubectl apply
    --dry-run=client` still asks an API server for its resource list). If this fails, kubectl itself
    would refuse the file."""
    import shutil

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here; the schema test above checks the same files offline")
    names = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        proc = subprocess.run(
            [kubectl, "label", "--local", "-f", str(path), "checked=yes", "-o", "name"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        names += proc.stdout.split()
    assert sorted(names) == [
        "deployment.apps/wan-spmd",
        "job.batch/wan-spmd-batch",
        "leaderworkerset.leaderworkerset.x-k8s.io/wan-spmd-2host",
        "persistentvolumeclaim/wan-spmd-compile-cache",
        "persistentvolumeclaim/wan-spmd-jobs",
        "service/wan-spmd",
        "service/wan-spmd-2host-http",
    ]
