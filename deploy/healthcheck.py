"""Container health probe: exit 0 when the local server's GET /health answers 200, else 1.

Standard library only, so it runs in any image that has Python. The port comes from
RADIODIFF_PORT (as the server reads it); `--url` overrides the whole address.
"""
from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def probe(url: str, timeout: float) -> tuple[bool, str]:
    """(healthy, what was seen) for one GET of `url`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200, f"{url}: HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return False, f"{url}: HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return False, f"{url}: {getattr(err, 'reason', err)}"


def main(argv: list[str] | None = None) -> int:
    port = os.environ.get("RADIODIFF_PORT", "8000")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--url", default=f"http://127.0.0.1:{port}/health")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    args = parser.parse_args(argv)
    healthy, seen = probe(args.url, args.timeout)
    print(seen, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
