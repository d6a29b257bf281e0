"""trainflow installs under one import namespace, ``trainflow.*``, and takes no common top-level name.

``tasks`` is a published package and a common module name in users' DAG folders, ``trainers`` is
generic: the folders keep the project's layout, but what is installed is ``trainflow.tasks``,
``trainflow.trainers`` and ``trainflow.airflow`` (pyproject.toml's package-dir mapping).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from trainflow.tasks.settings import PROJECT_DIR

IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import trainflow.tasks, trainflow.trainers, trainflow.airflow
    names = []
    for package in (trainflow.tasks, trainflow.trainers, trainflow.airflow):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)
            names.append(info.name)
    clashing = sorted(m for m in sys.modules if m.split(".")[0] in ("tasks", "trainers", "trainflow_airflow"))
    print(json.dumps({"imported": names, "clashing": clashing}))
    """
)


def test_every_module_imports_from_the_namespace_alone(tmp_path):
    """From a folder that is not the checkout (so ``tasks/`` is not on the path by accident), every
    module imports, and none of them pulls in a top-level ``tasks``/``trainers``/``trainflow_airflow``."""
    # A user's DAG folder with its own `tasks` module must not shadow or be shadowed by trainflow.
    (tmp_path / "tasks.py").write_text("USERS_OWN = True\n")
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "trainflow.tasks.pipeline" in result["imported"] and "trainflow.trainers.train" in result["imported"]
    assert "trainflow.airflow.dag_support" in result["imported"]
    # The only `tasks` loaded is the user's own file (imported by nothing of trainflow's).
    assert result["clashing"] == [], result["clashing"]


def test_no_code_refers_to_the_old_top_level_names():
    """Module paths in strings (``python -m``, entry points, lazy imports, loggers) use the namespace too."""
    import re

    files = subprocess.run(["git", "-C", str(PROJECT_DIR), "ls-files", "tasks", "trainers", "plugins", "dags",
                            "scripts", "docker", "pyproject.toml"],
                           capture_output=True, text=True, check=True).stdout.split()
    old = re.compile(r"(?<![\w./-])(?:(?:tasks|trainers)\.[a-z_]+\b|trainflow_airflow\b(?!/))|\b(?:from|import) (?:tasks|trainers)\b")
    offenders = [
        f"{path}:{n}: {line.strip()}"
        for path in files if path.endswith((".py", ".sh", ".toml", ".yml", "Dockerfile"))
        for n, line in enumerate((PROJECT_DIR / path).read_text().splitlines(), 1)
        if old.search(line)
    ]
    assert not offenders, "old import names:\n" + "\n".join(offenders)
    assert old.search("from tasks.settings import x") and old.search('"trainers.train"')
    assert not old.search("from trainflow.tasks.settings import x") and not old.search("plugins/trainflow_airflow/x.py")
