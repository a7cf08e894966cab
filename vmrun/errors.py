"""The one error hierarchy of vmrun.

Every failure a user can cause or meet is a VmrunError; the CLI's single top-level handler
turns it into one line on stderr, a runc-style JSON line in the --log file, and an exit code.
"""

from __future__ import annotations


class VmrunError(Exception):
    """Base of every error vmrun reports to its caller."""

    exit_code = 1


class UsageError(VmrunError):
    """The command line itself is wrong (an unknown flag, a missing argument): exit 1, as
    runc's every error."""


class ConfigError(VmrunError):
    """vmrun's own configuration (vmrun.toml) is invalid."""


class InvalidIdError(VmrunError):
    """A container id that is empty or could escape the state directory."""


class ContainerNotFoundError(VmrunError):
    """No state exists for the given container id."""


class ContainerExistsError(VmrunError):
    """The container id is already in use."""


class StateConflictError(VmrunError):
    """The container is not in a state that allows the operation."""


class BundleError(VmrunError):
    """The OCI bundle is unusable: config.json unreadable or invalid, rootfs missing."""


class CommandError(VmrunError):
    """A helper command we ran failed."""


class ImageError(VmrunError):
    """The guest image is missing or could not be built."""


class HypervisorError(VmrunError):
    """QEMU, virtiofsd or the vsock device failed."""


class VsockError(HypervisorError):
    """The vsock transport failed to connect or broke."""


class NetworkError(VmrunError):
    """The pod's network namespace could not be carried into the guest."""


class AgentError(VmrunError):
    """The in-guest agent failed or could not be reached."""


class AgentGoneError(AgentError):
    """The connection to the agent broke or could not be made: the guest may be gone."""


class Interrupted(VmrunError):
    """A stop signal arrived before the work was done: unwind, cleaning up."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
