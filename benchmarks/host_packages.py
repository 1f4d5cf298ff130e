"""Keep an environment to a lent GPU host's packages (benchmarks/gpu-host-packages.txt).

``make gpu-host-sim`` installs the host's packages that memray needs; pip also brings what those
need in their newest releases, which the host's older releases may not (e.g. a typer that needs
pydantic, which the host lacks). What the host does not have is uninstalled here, so a missing
wheel in ``.whl/`` shows in the simulation as it would on the host.

    python benchmarks/host_packages.py PYTHON     # PYTHON: the simulated host's interpreter
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

LIST = pathlib.Path(__file__).resolve().parent / "gpu-host-packages.txt"


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv=None) -> int:
    python = (argv or sys.argv[1:])[0]
    host = {_name(line) for line in LIST.read_text().splitlines() if line and not line.startswith("#")}
    host |= {"pip", "memray-layers"}
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    )
    extra = sorted(p["name"] for p in json.loads(listed.stdout) if _name(p["name"]) not in host)
    if extra:
        subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
    print(f"host environment: {len(extra)} package(s) the host lacks removed: {', '.join(extra) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
