"""Finding the controller on the local network with zeroconf (``_farm._tcp.local.``).

The controller publishes its cluster name, API URL, Dask scheduler address and
certificate fingerprint in TXT records; nodes and clients browse for them. Nothing
secret is published: joining still needs the cluster bundle.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from farm import __version__

SERVICE_TYPE = "_farm._tcp.local."


@dataclass
class Advertised:
    cluster: str
    api: str
    scheduler: str
    fingerprint: str
    version: str = ""


def local_addresses() -> list[str]:
    """IPv4 addresses of this host other than loopback, or loopback when there is none."""
    import ifaddr  # zeroconf's own dependency for listing interfaces

    found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if isinstance(ip.ip, str) and not ip.ip.startswith("127.")]
    return found or ["127.0.0.1"]


class Advertiser:
    """Publishes the controller while it runs."""

    def __init__(self, info: Advertised, port: int, addresses: list[str] | None = None):
        from zeroconf import ServiceInfo, Zeroconf

        self.addresses = addresses or local_addresses()
        self.zeroconf = Zeroconf(interfaces=self.addresses) if addresses else Zeroconf()
        host = socket.gethostname().split(".")[0] or "farm"
        self.service = ServiceInfo(
            SERVICE_TYPE,
            f"{info.cluster}-{host}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(addr) for addr in self.addresses],
            port=port,
            properties={"cluster": info.cluster, "api": info.api, "scheduler": info.scheduler,
                        "fingerprint": info.fingerprint, "version": __version__},
            server=f"{host}.local.",
        )
        self.zeroconf.register_service(self.service, allow_name_change=True)

    def close(self) -> None:
        try:
            self.zeroconf.unregister_service(self.service)
        finally:
            self.zeroconf.close()


def browse(cluster: str | None = None, timeout: float = 5.0, interfaces: Any = None) -> list[Advertised]:
    """Controllers seen within ``timeout`` seconds (only ``cluster``'s when given)."""
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    zeroconf = Zeroconf(interfaces=interfaces) if interfaces else Zeroconf()
    found: dict[str, Advertised] = {}
    names: list[str] = []

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.append(name)

    browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[on_change])
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            while names:
                name = names.pop()
                info = zeroconf.get_service_info(SERVICE_TYPE, name, timeout=1500)
                if info is None:
                    continue
                props = {k.decode(): (v.decode() if v else "") for k, v in info.properties.items()}
                entry = Advertised(props.get("cluster", ""), props.get("api", ""), props.get("scheduler", ""),
                                   props.get("fingerprint", ""), props.get("version", ""))
                if cluster is None or entry.cluster == cluster:
                    found[name] = entry
            if found and cluster is not None:
                break
            time.sleep(0.05)
    finally:
        browser.cancel()
        zeroconf.close()
    return list(found.values())
