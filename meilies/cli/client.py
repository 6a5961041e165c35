"""``meilies-cli``: the command-line client (issue 4 builds it on meilies.client)."""

from __future__ import annotations

import sys


def main() -> None:
    """Not built yet: say so plainly, exit 2 (usage), as the foundation issue allows."""
    print("meilies-cli: not yet implemented; use redis-cli -p 6480 meanwhile", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
