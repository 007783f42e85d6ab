"""docker-compose.yml is parsed by a real compose implementation (no Docker engine needed)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # comes with transformers; parses the normalised file compose prints

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose not installed (Debian package docker-compose)")
def test_compose_file_validates_and_wires_the_swarm(tmp_path):
    # compose reads env_file relative to the project directory; use the example's values.
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__"))
    (project / "swarm.env").write_text((ROOT / "swarm.env.example").read_text())
    out = subprocess.run([COMPOSE, "config"], cwd=project, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr

    config = yaml.safe_load(out.stdout)
    services = config["services"]
    assert set(services) == {"coordinator", "node1", "node2", "node3", "trainer"}
    for name in ("node1", "node2", "node3", "trainer"):
        command = " ".join(services[name]["command"])
        assert "--coordinator coordinator:7070" in command
        assert services[name]["environment"]["POLLINATE_TOKEN"] == "change-me-to-a-long-random-secret"
    assert services["coordinator"]["command"][0] == "coordinator"


def test_compose_example_env_and_data_exist():
    assert "POLLINATE_TOKEN=" in (ROOT / "swarm.env.example").read_text()
    assert (ROOT / "examples" / "train.jsonl").stat().st_size > 0
