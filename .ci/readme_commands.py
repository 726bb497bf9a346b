"""Print the README's quick-start commands, one per line: the ```bash blocks of its "## Quick start" section.

``.ci/run`` runs what this prints, so CI runs exactly what a newcomer copies.
Exits with status 2 unless the section holds exactly two one-line commands.

    python3 .ci/readme_commands.py README.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def quickstart_commands(readme: str) -> list[str]:
    """The commands in the ```bash blocks of the "## Quick start" section, in order."""
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, re.S | re.M)
    if section is None:
        raise ValueError('the README has no "## Quick start" section')
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


if __name__ == "__main__":
    commands = quickstart_commands(Path(sys.argv[1]).read_text())
    if len(commands) != 2:
        sys.exit(f"expected the install-and-run command and the test command, found {len(commands)}: {commands}")
    print("\n".join(commands))
