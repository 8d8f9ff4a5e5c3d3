"""The image's HEALTHCHECK: GET routerd's /healthz (or the path given) on
ROUTERD_METRICS_LISTEN; exit 0 when it answers 200, else 1 with the reason.

Standard library only, so it needs nothing the image does not already have.
"""

import os
import sys
import urllib.request


def url(listen: str, path: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def main() -> int:
    target = url(
        os.environ.get("ROUTERD_METRICS_LISTEN", "127.0.0.1:9145"),
        sys.argv[1] if len(sys.argv) > 1 else "/healthz",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(target, timeout=3) as answer:
            print(f"{target}: {answer.status} {answer.read(200).decode(errors='replace').strip()}")
            return 0
    except Exception as exc:  # noqa: BLE001  (any failure means unhealthy; say why)
        print(f"{target}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
