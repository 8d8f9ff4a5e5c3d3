"""The error tree. Every error carries what a person needs to find the fault:
the etcd key, the file and line, or the flag. Third-party errors are chained
with ``from`` so the cause is never lost.

    RouterdError
      ConfigError        a flag, variable or file given to routerd (exit 2)
      InvalidValue       a value read from etcd, naming its key
      RenderError        a template
      ValidationError    a candidate refused by crossplane or nginx -t
      InstallError       a file beside nginx.conf that could not be written
      Held               a snapshot the shrink guard keeps from nginx
      ReloadError        nginx did not take a config
        NginxNotRunning  (sidecar) no master to signal yet
        RolledBack       a reload failed; the previous config is back
      StoreError         etcd
        Compacted        the revision to resume from is gone
        Unavailable      no member answered in time (a write's outcome is unknown)
      ContainerError     a Docker engine
        Unhealthy        a container that will never be healthy
      DeployError        a deploy that cannot go on (it rolls back)
        LockHeld         another deploy of the same app runs
        Unplaceable      no set of hosts can hold the containers asked for
        StepFailed       one of the six steps, by number
"""

from __future__ import annotations


class RouterdError(Exception):
    """Base of every error routerd raises on purpose."""


class ConfigError(RouterdError):
    """A flag, environment variable or file given to routerd is wrong."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class InvalidValue(RouterdError):
    """A value read from etcd failed validation; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class RenderError(RouterdError):
    """A template failed to render (syntax, undefined name, unsafe value)."""


class ValidationError(RouterdError):
    """A candidate config was refused by crossplane or ``nginx -t``."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        where = f"{file}:{line}: " if file and line else f"{file}: " if file else ""
        super().__init__(f"{where}{message}")
        self.file = file
        self.line = line


class InstallError(RouterdError):
    """A file beside nginx.conf could not be written (a full disk, a read-only
    folder); the message names the file. The files in use are untouched."""


class Held(RouterdError):
    """A snapshot that would drop all apps, or most of them, is kept from nginx."""


class ReloadError(RouterdError):
    """nginx did not take the new config (signal failed or generation not confirmed)."""


class NginxNotRunning(ReloadError):
    """Sidecar mode: no nginx master yet. The valid file stays for its start."""


class RolledBack(ReloadError):
    """nginx did not take a candidate; the previous config was put back."""


class StoreError(RouterdError):
    """etcd could not be reached or answered with an error."""


class Compacted(StoreError):
    """The revision to resume a watch from was compacted: take a new snapshot."""


class Unavailable(StoreError):
    """etcd did not answer: the member is down, has no leader, or timed out. Worth
    another try on another member; a write that failed so may have been applied."""


class ContainerError(RouterdError):
    """The container runtime failed: an image is missing, a container died or never got healthy."""


class Unhealthy(ContainerError):
    """The container is gone for good (exited or removed): waiting longer is pointless."""


class DeployError(RouterdError):
    """A deploy could not go on; the controller rolls back what it did."""


class LockHeld(DeployError):
    """Another controller is deploying the same app; ``holder`` says who."""

    def __init__(self, app: str, holder: str) -> None:
        super().__init__(f"another deploy of {app} is running: the lock is {holder}")
        self.app = app
        self.holder = holder


class Unplaceable(DeployError):
    """The containers asked for fit on no set of hosts; the message names the shortfall."""


class StepFailed(DeployError):
    """Step ``number`` (``name``) of a deploy failed for ``reason``."""

    def __init__(self, number: int, name: str, reason: str) -> None:
        super().__init__(f"step {number} ({name}) failed: {reason}")
        self.number, self.name, self.reason = number, name, reason
