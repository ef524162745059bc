"""`python -m db.squawk`: lint every migration and function file with squawk (`make lint`).

Transactional migrations are linted as running inside a transaction and
`-- migrate:no-transaction` ones as not, so squawk judges each as it really runs;
function files (db/functions) always run in a transaction.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from db.migrations import MIGRATIONS_DIR, load_function_files, load_migrations

CONFIG = Path(__file__).resolve().parent.parent / ".squawk.toml"


def main() -> int:
    squawk = shutil.which("squawk") or str(Path(sys.executable).parent / "squawk")
    migrations = load_migrations(MIGRATIONS_DIR)
    groups = {
        "--assume-in-transaction": [str(m.path) for m in migrations if m.transactional]
        + [str(f.path) for f in load_function_files()],
        "--no-assume-in-transaction": [str(m.path) for m in migrations if not m.transactional],
    }
    status = 0
    for flag, files in groups.items():
        if files:
            status |= subprocess.call([squawk, "-c", str(CONFIG), flag, *files])
    return status


if __name__ == "__main__":
    sys.exit(main())
