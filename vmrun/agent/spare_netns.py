"""A network namespace made ahead of time, for the first container that asks for a new one.

Creating a network namespace and bringing its loopback up is among the dearest steps of
a container's creation under TCG: about 25 ms of a clone's `crun run`, measured, for
kernel code every clone translates anew. Made before a template is saved, the namespace
is in each clone already. The first container whose spec asks for a new network
namespace (one with no path) joins this one instead, which is just as new: nothing but
a loopback that is up, as crun leaves a namespace it creates. The agent lets go of it
once crun has run, so it is that container's alone and goes with it.
"""

from __future__ import annotations

import os
import threading

from vmrun.common import linux

SPARE_NETNS = "/run/vmrun/netns/spare"


class SpareNetns:
    def __init__(self, path: str = SPARE_NETNS):
        self.path = path
        self._lock = threading.Lock()
        self._ready = False

    def make(self) -> None:
        """Create the namespace, held by a bind mount of its nsfs file on `path`."""
        failure: list[OSError] = []

        def create() -> None:
            # In a thread of its own: unshare(CLONE_NEWNET) moves only the calling thread,
            # which ends here; the bind mount keeps the namespace alive. (Not vmrun.threads:
            # the guest has vmrun/agent/ only.)
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                open(self.path, "w").close()
                linux.unshare(linux.CLONE_NEWNET)
                linux.set_link_up("lo")
                linux.mount("/proc/thread-self/ns/net", self.path, "none", linux.MS_BIND)
            except OSError as exc:
                failure.append(exc)

        thread = threading.Thread(target=create, name="spare-netns")
        thread.start()
        thread.join()
        if failure:
            self._remove()
            raise failure[0]
        self._ready = True

    def offer(self, spec: dict) -> bool:
        """Point the spec's new network namespace, if it asks for one, at the spare; True
        when it did. The caller calls release() once crun has run, whatever happened."""
        with self._lock:
            if not self._ready:
                return False
            linux_section = spec.get("linux")
            namespaces = linux_section.get("namespaces") if isinstance(linux_section, dict) else None
            for namespace in namespaces if isinstance(namespaces, list) else []:
                if isinstance(namespace, dict) and namespace.get("type") == "network" and not namespace.get("path"):
                    namespace["path"] = self.path
                    self._ready = False  # one container only
                    return True
            return False

    def release(self) -> None:
        """Let go of the namespace: from now on only its container holds it."""
        self._remove()

    def _remove(self) -> None:
        if linux.is_mounted(self.path):
            linux.umount(self.path, detach=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
