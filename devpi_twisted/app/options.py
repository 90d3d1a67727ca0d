"""
The options of C{twistd devpi}, and the typed-options base they (and the
admin commands') share: errors that fit on one line.  Twisted's typed options
say "Parameter type enforcement failed: invalid literal for int()" without
naming the option; ours name it and the kind of value wanted.
"""

import os
import sys
from typing import Any

from twisted.python import usage

from devpi_twisted.app.backendoptions import BACKEND_FLAGS, BACKEND_PARAMETERS, backendSettings
from devpi_twisted.config import DEFAULT_LISTEN, DEFAULT_SERVERDIR, ServerConfig, serverdirPath
from devpi_twisted.errors import ServerDirError
from devpi_twisted.model.acl import Policy

_KINDS = {int: "a whole number", float: "a number"}


class _NamedCoercion(usage.CoerceParameter):
    def dispatch(self, parameterName: str, value: Any) -> None:
        try:
            super().dispatch(parameterName, value)
        except usage.UsageError:
            raise usage.UsageError(f"--{parameterName} {value!r}: must be {_KINDS.get(self.coerce, 'valid')}")


class TypedOptions(usage.Options):
    """L{usage.Options} with typed options that name themselves in errors."""

    def __init__(self) -> None:
        super().__init__()
        self._dispatch = {name: _NamedCoercion(self, handler.coerce) if type(handler) is usage.CoerceParameter
                          else handler for name, handler in self._dispatch.items()}


ENV_PREFIX = "DEVPI_TWISTED_"


class Options(TypedOptions):
    """Options of C{twistd devpi}; each also reads C{DEVPI_TWISTED_<OPTION>}."""

    synopsis = "[options]"
    longdesc = (
        "Serve a devpi-compatible package index. An empty or missing --serverdir is "
        "initialised first (root user, root/pypi mirror). Every option can also be set "
        "with an environment variable DEVPI_TWISTED_<OPTION>, e.g. DEVPI_TWISTED_SERVERDIR; "
        "the command line wins."
    )
    optParameters = [
        ["serverdir", None, DEFAULT_SERVERDIR, "The server directory (state, files, secret)."],
        *BACKEND_PARAMETERS,
        ["workers", None, "1",
         "Serving processes on this machine sharing the listening port and the data: a number, or "
         "'auto' for one per core (README \"Scaling out\")."],
        ["outside-url", None, None, "The URL clients reach this server at (behind a proxy)."],
        ["restrict-modify", None, None,
         "Comma-separated users who alone may create and change users and indexes (root always may)."],
        ["mirror-creators", None, "root",
         "Who may create mirror indexes or set mirror_url: 'root' or 'users' (devpi's behaviour)."],
        ["mirror-cache-expiry", None, 1800, "Default seconds before a mirror page is revalidated.", int],
        ["max-upload-size", None, 1024 ** 3, "Largest request body (upload) in bytes; larger ones get 413.", int],
        ["doc-max-entries", None, 20000, "Most files a documentation zip may hold.", int],
        ["doc-max-size", None, 1024 ** 3, "Most bytes a documentation zip may unpack to.", int],
        ["root-passwd", None, None, "Password for root when the directory is initialised."],
        ["request-timeout", None, 5.0,
         "Seconds to wait for an upstream index to start answering (and between chunks, times 6).", float],
        ["upstream-ca", None, None,
         "PEM file of CA certificates trusted for upstream TLS, instead of the system's."],
        # operations (README "Deployment")
        ["shutdown-grace", None, 30.0,
         "Seconds requests in flight may take to finish after SIGTERM before they are cut off.", float],
        ["idle-timeout", None, 60.0, "Seconds a connection may stay silent between requests.", float],
        ["header-timeout", None, 30.0, "Seconds a client may take to send a request's line and headers.", float],
        ["body-timeout", None, 60.0,
         "Seconds a request body gets; it gets more while it keeps coming at --min-body-rate, "
         "else 408.", float],
        ["min-body-rate", None, 8192,
         "Bytes a second a request body must keep coming at, over each --body-timeout.", int],
        ["max-header-size", None, 16384, "Largest request line plus headers, in bytes.", int],
        ["max-connections", None, 500, "Most client connections open at once; more are answered 503.", int],
        ["max-upstream-fetches", None, 32, "Most requests to upstream indexes running at once.", int],
        ["login-max-failures", None, 5,
         "Failed logins of one user from one address within --login-window before 429 (0: no throttling).", int],
        ["login-user-failures", None, 50,
         "Failed logins of one user from all addresses within --login-window before 429, except from "
         "addresses the user has logged in from (0: no such limit).", int],
        ["login-addr-failures", None, 100,
         "Failed logins from one address (IPv6: one /64) for all users within --login-window before 429, "
         "except for users who have logged in from there (0: no such limit).", int],
        ["login-window", None, 60.0, "Seconds a failed login counts for throttling.", float],
        ["trusted-proxies", None, None,
         "Comma-separated addresses of reverse proxies whose X-Forwarded-For names the client."],
        ["page-cache-size", None, 256 * 1024 ** 2,
         "Most bytes of rendered simple pages and project lists kept in memory (least recently used "
         "go first; a page larger than this is rendered for each request).", int],
        ["json-log", None, None, "Also log JSON lines to this file ('-': standard output)."],
        ["blob-collect-interval", None, 3600.0,
         "Seconds between passes that free the disk space of files nothing refers to any more "
         "(deleted, overwritten); such a file goes after two to three intervals (0: only at startup).", float],
        ["history-keep", None, 7 * 24 * 3600.0,
         "Seconds of history (older values, the changelog) the database keeps for replicas and "
         "event subscribers; a replica further behind starts over from a snapshot.", float],
        ["history-prune-interval", None, 3600.0,
         "Seconds between passes that prune history older than --history-keep (0: never prune).", float],
        ["retention-interval", None, 86400.0,
         "Seconds between runs that apply every private index's retention policy "
         "(README \"Retention\"; 0: only when asked through POST /USER/INDEX/+retention).", float],
        # replication (README "Replication")
        ["primary-url", None, None,
         "Run as a replica of the devpi-twisted primary at this URL (an empty --serverdir is "
         "filled from it); writes sent here are forwarded to it."],
        ["secretfile", None, None,
         "File with the secret shared by a primary and its replicas (mode 0600, at least 32 bytes); "
         "signs login tokens and replication credentials. Default: the server directory's .secret "
         "(a replica needs it: give it a copy of the primary's)."],
        ["replica-poll-timeout", None, 25.0,
         "Seconds a replica's request for changes may wait on the primary (long poll).", float],
    ]
    optFlags = [
        *BACKEND_FLAGS,
        ["no-root-pypi", None, "When initialising, do not create the root/pypi mirror."],
        ["offline-mode", None, "Never contact upstream indexes; mirrors list only cached files."],
        ["requests-only", None,
         "Run as an extra worker next to the main process on the same --serverdir: serve requests, "
         "run no background jobs (README \"Workers\")."],
        ["no-access-log", None, "Do not log a line per request."],
        ["webhook-allow-private", None,
         "Let webhooks reach loopback, private and link-local addresses (refused by default)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to serve on, repeatable [default: tcp:3141:interface=127.0.0.1]."""
        self["listen"].append(description)

    def parseOptions(self, options: Any = None) -> None:
        try:
            self._applyEnvironment(os.environ)
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # Under twistd, which would print the whole --help above the error.
            sys.stderr.write(f"devpi-twisted: {e} (see 'twistd devpi --help')\n")
            raise SystemExit(1)

    def _applyEnvironment(self, environ: Any) -> None:
        for long, _, _, _, *coerce in self.optParameters:
            name = ENV_PREFIX + long.upper().replace("-", "_")
            value = environ.get(name)
            if value is not None:
                try:
                    self[long] = coerce[0](value) if coerce else value
                except ValueError:
                    raise usage.UsageError(f"{name}={value!r} is not a valid value for --{long}")
        for long, _, _ in self.optFlags:
            value = environ.get(ENV_PREFIX + long.upper().replace("-", "_"))
            if value is not None:
                self[long] = 1 if value.strip().lower() in ("1", "true", "yes", "on") else 0
        listen = environ.get(ENV_PREFIX + "LISTEN")
        if listen:
            self._envListen = listen.split()

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = getattr(self, "_envListen", None) or [DEFAULT_LISTEN]
        if self["mirror-creators"] not in ("root", "users"):
            raise usage.UsageError("--mirror-creators must be 'root' or 'users'")
        if self["mirror-cache-expiry"] < 0:
            raise usage.UsageError("--mirror-cache-expiry must not be negative")
        if self["max-upload-size"] <= 0:
            raise usage.UsageError("--max-upload-size must be positive")
        if self["request-timeout"] <= 0:
            raise usage.UsageError("--request-timeout must be positive")
        if self["upstream-ca"] is not None and not os.path.isfile(self["upstream-ca"]):
            raise usage.UsageError(f"--upstream-ca: no such file {self['upstream-ca']!r}")
        for name in ("shutdown-grace", "idle-timeout", "header-timeout", "body-timeout", "login-window"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        for name in ("max-header-size", "max-connections", "max-upstream-fetches", "min-body-rate"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        for name in ("blob-collect-interval", "history-keep", "history-prune-interval", "retention-interval"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must not be negative")
        for name in ("login-max-failures", "login-user-failures", "login-addr-failures"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must not be negative")
        if self["page-cache-size"] < 0:
            raise usage.UsageError("--page-cache-size must not be negative")
        self._checkReplication()
        self["backend"] = backendSettings(self, environ={})  # the environment was applied above
        for description in self["listen"]:
            if description.startswith("ssl:") and "sslmethod=" in description:
                raise usage.UsageError(
                    f"--listen {description!r}: sslmethod is not supported; TLS 1.2 and 1.3 with "
                    "modern ciphers (Twisted's defaults) are always used"
                )
        self._checkWorkers()

    def _checkWorkers(self) -> None:
        value = str(self["workers"]).strip().lower()
        if value == "auto":
            count = os.cpu_count() or 1
        else:
            try:
                count = int(value)
            except ValueError:
                raise usage.UsageError(f"--workers {self['workers']!r}: must be a whole number or 'auto'")
            if count < 1:
                raise usage.UsageError("--workers must be at least 1")
        if count > 1 and (self["requests-only"] or self["primary-url"] is not None):
            raise usage.UsageError("--workers is for the main process of a primary or standalone server")
        if count > 1:
            from devpi_twisted.app.workers import reusePortDescription

            for description in self["listen"]:
                try:
                    reusePortDescription(description)
                except ValueError as e:
                    raise usage.UsageError(str(e))
        self["workers"] = count

    def _checkReplication(self) -> None:
        from devpi_twisted.replica.client import checkPrimaryURL
        from devpi_twisted.app.serverdir import loadSecretFile

        if self["primary-url"] is not None:
            try:
                self["primary-url"] = checkPrimaryURL(self["primary-url"])
            except ValueError as e:
                raise usage.UsageError(f"--primary-url: {e}")
            if self["secretfile"] is None:
                raise usage.UsageError(
                    "a replica (--primary-url) needs --secretfile: a copy of the primary's secret "
                    "(its --secretfile, or the .secret in its server directory)"
                )
            if self["requests-only"]:
                raise usage.UsageError("--requests-only workers of a replica are not supported")
        if self["secretfile"] is not None:
            try:
                loadSecretFile(self["secretfile"])
            except ServerDirError as e:
                raise usage.UsageError(str(e))
        if not 0 < self["replica-poll-timeout"] <= 30:
            raise usage.UsageError("--replica-poll-timeout must be more than 0 and at most 30 seconds")

    def toConfig(self) -> ServerConfig:
        restrict = self["restrict-modify"]
        return ServerConfig(
            serverdir=serverdirPath(self["serverdir"]),
            listen=tuple(self["listen"]),
            backend=self["backend"],
            workers=self["workers"],
            outsideURL=self["outside-url"].rstrip("/") if self["outside-url"] else None,
            policy=Policy(
                restrictModify=tuple(p.strip() for p in restrict.split(",") if p.strip())
                if restrict is not None
                else None,
                mirrorCreators=self["mirror-creators"],
            ),
            mirrorCacheExpiry=self["mirror-cache-expiry"],
            maxUploadSize=self["max-upload-size"],
            docMaxEntries=self["doc-max-entries"],
            docMaxSize=self["doc-max-size"],
            requestTimeout=self["request-timeout"],
            upstreamCA=self["upstream-ca"],
            offlineMode=bool(self["offline-mode"]),
            rootPassword=self["root-passwd"],
            requestsOnly=bool(self["requests-only"]),
            webhookAllowPrivate=bool(self["webhook-allow-private"]),
            blobCollectInterval=self["blob-collect-interval"],
            historyKeep=self["history-keep"],
            historyPruneInterval=self["history-prune-interval"],
            retentionInterval=self["retention-interval"],
            shutdownGrace=self["shutdown-grace"],
            idleTimeout=self["idle-timeout"],
            headerTimeout=self["header-timeout"],
            bodyTimeout=self["body-timeout"],
            minBodyRate=self["min-body-rate"],
            maxHeaderSize=self["max-header-size"],
            maxConnections=self["max-connections"],
            maxUpstreamFetches=self["max-upstream-fetches"],
            loginMaxFailures=self["login-max-failures"],
            loginWindow=self["login-window"],
            loginMaxUserFailures=self["login-user-failures"],
            loginMaxAddressFailures=self["login-addr-failures"],
            trustedProxies=tuple(p.strip() for p in (self["trusted-proxies"] or "").split(",") if p.strip()),
            pageCacheSize=self["page-cache-size"],
            accessLog=not self["no-access-log"],
            jsonLog=self["json-log"],
            primaryURL=self["primary-url"],
            secretFile=os.path.abspath(self["secretfile"]) if self["secretfile"] else None,
            replicaPollTimeout=self["replica-poll-timeout"],
        )
