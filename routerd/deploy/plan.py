"""What a deploy decided, how it is tuned, and what it has done so far.

``Plan`` is read from etcd once the app's lock is held and never changes;
``Journal`` grows as the steps run and is all a rollback needs to know.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from routerd.deploy.canary import Canary
from routerd.deploy.releases import Release
from routerd.deploy.runtime import Container


@dataclass(frozen=True)
class DeployOptions:
    health_timeout: float = 30.0
    drain: float = 2.0
    router_timeout: float = 30.0
    wait_routers: bool = True
    stop_timeout: float = 10.0
    lock_ttl: int = 10
    rollback_timeout: float = 30.0
    canary: Canary | None = None  # --canary: weighted steps before the switch


@dataclass(frozen=True)
class Plan:
    app: str
    release: Release
    pool: str
    active: str | None
    active_mod: int  # mod revision of ``active`` as read; 0 when there is none
    registered: frozenset[str]  # releases with instances before the deploy
    served_by: dict[str, str]  # router id -> config hash before the deploy
    version_mod: int = 0  # mod revision of apps/<app>/version as read; 0 when absent
    restore_config: dict[str, str] | None = None  # a rollback puts these config vars back
    placement: tuple[str, ...] = ()  # the host of each container; "" for the one local engine
    weights_mod: int = 0  # mod revision of ``weights`` as read; 0 when there are none

    def host_of(self, index: int) -> str:
        return self.placement[index] if index < len(self.placement) else ""

    @property
    def first(self) -> bool:
        """Nothing routed before: the new release becomes active as it registers."""
        return self.active is None and not self.registered

    @property
    def old(self) -> list[str]:
        """The releases step 6 removes."""
        return sorted(self.registered | ({self.active} if self.active else set()))

    @property
    def serving(self) -> str:
        return self.active or "nothing (first release)"


@dataclass
class Journal:
    threads: list[asyncio.Future[Any]] = field(default_factory=list)  # runtime calls in flight
    containers: list[Container] = field(default_factory=list)
    registered: bool = False  # the register transaction was sent (its outcome may be unknown)
    weights: list[bytes] = field(default_factory=list)  # canary weights sent, in order
    switched: bool = False  # the switch transaction was sent
    committed: bool = False  # the drain is over: no way back
