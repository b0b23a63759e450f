"""The docs site: it builds with warnings as errors, and the tutorial's code runs."""

import pathlib
import re
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.timeout(300)
def test_the_docs_site_builds_without_warnings(tmp_path):
    built = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                            "html", str(DOCS), str(tmp_path / "html")], capture_output=True,
                           text=True, timeout=280)
    assert built.returncode == 0, built.stderr[-5000:]
    reference = (tmp_path / "html" / "reference.html").read_text()
    assert "Pool.map" in reference and "RemoteData.result" in reference  # from docstrings
    assert (tmp_path / "html" / "_images" / "status-page.png").exists()


@pytest.mark.timeout(300)
def test_the_tutorial_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "tutorial.md").read_text(), re.S)
    assert len(blocks) >= 5
    script = tmp_path / "tutorial.py"  # a user's script: its functions are __main__'s
    script.write_text("\n".join(blocks))
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=280, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-5000:]
    assert "workers ran" in ran.stdout
