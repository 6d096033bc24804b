"""Print the requirements of one image: pyproject.toml's core dependencies and one extra.

    python requirements.py gateway > requirements.txt     # in deploy/Dockerfile's build stages

Standard library only: it runs in the build stage before anything is installed.
"""

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extra: str) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"][extra]]


if __name__ == "__main__":
    print("\n".join(requirements(Path("pyproject.toml"), sys.argv[1])))
