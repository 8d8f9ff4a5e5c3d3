"""The entry point: dispatch to each side's commands; the only place that exits.

Exit codes: 0 success, 1 the work failed (invalid config, etcd error, a
deploy failed and was rolled back), 2 bad usage (a flag, argument or
ROUTERD_* variable is wrong; the message names it), 130 interrupted (a
deploy was rolled back).
"""

from __future__ import annotations

import sys

import click

from routerd import __version__
from routerd.deploy.commands import COMMANDS as DEPLOY_COMMANDS
from routerd.deploy.lifecycle import COMMANDS as LIFECYCLE_COMMANDS
from routerd.errors import ConfigError, RenderError, RouterdError, ValidationError
from routerd.router.commands import COMMANDS as ROUTER_COMMANDS
from routerd.settings import Group, check_environment

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\b
Every flag can also be set as ROUTERD_<FLAG> in the environment (upper
case, dashes as underscores; a repeatable flag takes a comma list),
e.g. ROUTERD_ETCD=http://10.0.0.5:2379.

\b
examples:
  routerd run --nginx-conf /etc/nginx/nginx.conf --supervise
  routerd render --dry-run --diff --nginx-conf /etc/nginx/nginx.conf
  routerd apps set shop --domain shop.example.com --option client_max_body_size=50m
  routerd hosts add node-1 --docker tcp://10.0.1.5:2376 --address 10.0.1.5 \\
      --tag dataPlane=true,routerMesh=true,high=false \\
      --tls-ca ca.pem --tls-cert cert.pem --tls-key key.pem
  routerd deploy shop --image shop:42 --replicas 2 --env DATABASE_URL=postgres://db/shop
  routerd deploy shop --image shop:43 --replicas 2 --cpus 0.5 --memory 512 --constraint zone=b
  routerd scale shop 4
  routerd rollback shop
  routerd status shop
"""


@click.group(cls=Group, epilog=EPILOG)
@click.version_option(__version__, prog_name="routerd", message="%(prog)s %(version)s")
def routerd() -> None:
    """Router configuration sidecar for nginx: etcd in, confirmed reloads out."""


for command in (*ROUTER_COMMANDS, *DEPLOY_COMMANDS, *LIFECYCLE_COMMANDS):
    routerd.add_command(command)


def main(argv: list[str] | None = None) -> int:
    try:
        check_environment(routerd)
        code = routerd.main(argv, prog_name="routerd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except (click.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValidationError, RenderError) as exc:
        print(f"routerd: invalid: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except RouterdError as exc:
        print(f"routerd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
