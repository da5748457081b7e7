"""TLS for the server's listeners: certificate files checked at start, credentials for grpc.aio and an
`ssl.SSLContext` for the REST binding, both picking up renewed files at the next handshake, and the
warning when plaintext is exposed beyond loopback.

The files are read and checked once with Python's `ssl` module before any listener is built: grpc's own
failure on a bad certificate or a key that does not match it is a bare "could not add port", which
names neither file nor reason.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("cnnserve.tls")


class TlsConfigError(ValueError):
    """A TLS option set that cannot work (missing file, key not matching its certificate, ...)."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one listener. `mutual`: clients must present a certificate signed by `root_cert`."""

    server_cert: Path
    server_key: Path
    root_cert: Path | None = None
    mutual: bool = False

    @classmethod
    def from_flags(
        cls, protocol: str, use_ssl: bool, mutual: bool, cert: Path | None, key: Path | None, root: Path | None
    ) -> TlsFiles | None:
        """Triton's flag set (`--<protocol>-use-ssl`, `-use-ssl-mutual`, `-server-cert`, `-server-key`,
        `-root-cert`) -> TlsFiles, None for plaintext; a set that cannot work raises TlsConfigError."""
        if not (use_ssl or mutual):
            if cert or key or root:
                raise TlsConfigError(
                    f"--{protocol}-server-cert/-key/--{protocol}-root-cert given without "
                    f"--{protocol}-use-ssl: refusing to serve plaintext by mistake"
                )
            return None
        if cert is None or key is None:
            raise TlsConfigError(f"--{protocol}-use-ssl needs --{protocol}-server-cert and --{protocol}-server-key")
        if mutual and root is None:
            raise TlsConfigError(
                f"--{protocol}-use-ssl-mutual needs --{protocol}-root-cert (the CA that signs client certificates)"
            )
        files = cls(cert, key, root, mutual)
        files.check()
        return files

    def _read(self, path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise TlsConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None

    def check(self) -> None:
        """Every file readable and PEM, the key matching the certificate: raises TlsConfigError naming
        the file otherwise."""
        for path, what in (
            (self.server_cert, "server certificate"),
            (self.server_key, "server key"),
            *(((self.root_cert, "root certificate"),) if self.root_cert else ()),
        ):
            self._read(path, what)
        self.ssl_context()

    def _stamp(self) -> tuple:
        """What identifies the files' current contents cheaply (one stat each): (mtime_ns, size, inode)."""
        out = []
        for path in (self.server_cert, self.server_key, self.root_cert):
            try:
                st = path.stat() if path is not None else None
                out.append(None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _reloaded(self, state: dict, build):
        """`build()` when the files changed since state["stamp"] and are usable again, else None. A half
        rotated set (a new certificate beside the old key) is left alone and tried at the next handshake;
        the listener keeps the previous certificate meanwhile."""
        stamp = self._stamp()
        if stamp == state["stamp"]:
            return None
        try:
            self.check()
            fresh = build()
        except TlsConfigError as exc:
            if state.get("failed") != stamp:
                log.error("certificate files changed but cannot be used; serving the previous ones: %s", exc)
                state["failed"] = stamp
            return None
        state["stamp"] = stamp
        log.info("certificate files reloaded", extra={"certificate": str(self.server_cert)})
        return fresh

    def _grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        root = self._read(self.root_cert, "root certificate") if self.root_cert else None
        pair = (self._read(self.server_key, "server key"), self._read(self.server_cert, "server certificate"))
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials that pick up renewed files (cert-manager rotating a Secret): grpc asks before every
        new connection's handshake, and gets a new configuration only when the files changed."""
        state = {"stamp": self._stamp()}
        initial = self._grpc_configuration()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                return self._reloaded(state, self._grpc_configuration)
            except Exception:  # called from grpc's C core: never let it raise there
                log.exception("certificate reload failed")
                return None

        # grpc documents None from the fetcher as "keep the current configuration"; types-grpcio's stub omits it
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=self.mutual)  # type: ignore[arg-type]

    def reloading_ssl_context(self) -> ssl.SSLContext:
        """`ssl_context()` whose handshakes use a freshly built context once the files changed: the
        callback OpenSSL runs on every ClientHello (with or without SNI) swaps it in."""
        state: dict[str, Any] = {"stamp": self._stamp(), "ctx": None}  # the stamp, the swapped-in context
        listening = self.ssl_context()

        def on_hello(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
            try:
                fresh = self._reloaded(state, self.ssl_context)
            except Exception:  # inside OpenSSL's callback
                log.exception("certificate reload failed")
                fresh = None
            if fresh is not None:
                state["ctx"] = fresh
            if state["ctx"] is not None:
                sslobj.context = state["ctx"]

        listening.sni_callback = on_hello
        return listening

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context with the same certificate, key and client-certificate policy."""
        # Not create_default_context: it would also trust the system CAs for client certificates, and
        # mutual TLS must accept only clients signed by root_cert.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.server_cert, self.server_key)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(
                f"server certificate {self.server_cert} / key {self.server_key} unusable "
                f"(not PEM, or the key does not match the certificate): {exc}"
            ) from None
        if self.root_cert is not None:
            try:
                ctx.load_verify_locations(cafile=str(self.root_cert))
            except (ssl.SSLError, OSError) as exc:
                raise TlsConfigError(f"root certificate {self.root_cert} unusable: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if self.mutual else ssl.CERT_NONE
        return ctx


def is_loopback(address: str) -> bool:
    """True when a bind address only accepts connections from this host."""
    host = address.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it counts as exposed
        return False


def warn_if_exposed(protocol: str, address: str, tls: TlsFiles | None) -> bool:
    """Log a warning when `protocol` ("grpc", "http") serves plaintext beyond loopback; True if it did."""
    if tls is not None or is_loopback(address):
        return False
    log.warning(
        "%s listens in plaintext on %s: anyone who can reach the port can read and send requests; "
        "use --%s-use-ssl, or bind 127.0.0.1 behind a proxy that terminates TLS",
        protocol,
        address,
        protocol,
        extra={"protocol": protocol, "address": address},
    )
    return True
