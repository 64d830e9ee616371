"""The code's layers (.importlinter, docs/architecture.md "Layers and what each may import"),
checked by import-linter over the real import graph."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from engine import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), str(config), "--no-cache"],
                          cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_every_contract_is_kept():
    checked = lint_imports(REPO, REPO / ".importlinter")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "6 kept, 0 broken" in checked.stdout


def test_an_engine_module_importing_django_or_an_upper_layer_breaks_its_contracts(tmp_path):
    shutil.copytree(REPO / "imaging", tmp_path / "imaging")
    shutil.copytree(REPO / "webui", tmp_path / "webui")
    store = tmp_path / "imaging" / "datastore" / "store.py"
    store.write_text(store.read_text() + "\nimport django.conf\nfrom ..reading import mount\n")
    checked = lint_imports(tmp_path, REPO / ".importlinter")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "4 kept, 2 broken" in checked.stdout
    assert "imaging.datastore.store -> django (l." in checked.stdout
    assert "imaging.datastore.store -> imaging.reading.mount" in checked.stdout
