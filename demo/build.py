"""Build a release of the demo app into releases/<version> (used by pipelines.py)."""

from __future__ import annotations

import sys
from pathlib import Path

APP = '''"""The demo app, version {version}."""
import http.server
import os

VERSION = {version!r}
BROKEN = {broken!r}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("broken" if BROKEN else f"version {{VERSION}}").encode()
        self.send_response(500 if BROKEN else 200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


port = int(os.environ.get("PORT", "8765"))
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def main() -> int:
    version = sys.argv[1]
    broken = "--broken" in sys.argv[2:]
    if not version or "/" in version or version.startswith("."):
        print(f"bad version {version!r}", file=sys.stderr)
        return 2
    target = Path(__file__).resolve().parent.parent / "releases" / version
    target.mkdir(parents=True, exist_ok=True)
    (target / "app.py").write_text(APP.format(version=version, broken=broken))
    (target / "VERSION").write_text(version + "\n")
    print(f"built release {version} in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
