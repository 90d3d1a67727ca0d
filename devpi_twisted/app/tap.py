"""
The twistd plugin's entry: the options of C{twistd devpi} and C{makeService}.

C{makeService} is the one place that picks the real collaborators - the
global reactor, the listening endpoints, the server directory, the storage
backend, threads and HTTP connection pools - and hands them to the
composition root, L{devpi_twisted.app.compose.buildServer}.
"""

import os
import gc
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService

from devpi_twisted.app.compose import (
    buildServer, deliversEvents, eventServices, primaryPool, retentionSchedule, runsRetention, upstreamPool,
)
from devpi_twisted.app.endpoints import bindProblem, endpointDescription, listenSyntaxError
from devpi_twisted.app.logs import JSONLogService
from devpi_twisted.app.opendir import openServerDir
from devpi_twisted.app.options import Options
from devpi_twisted.app.serverdir import loadSecretFile
from devpi_twisted.app.shutdown import DrainService, ExitZeroOnSIGTERM, SequentialStopService, WebService
from devpi_twisted.app.storageservice import StorageService
from devpi_twisted.app.workers import WorkerPool, childCommand, parentWatch, reusePortDescription
from devpi_twisted.errors import ServerDirError, StorageError, StorageUnavailable
from devpi_twisted.interfaces import ISharedSecret
from devpi_twisted.storage.collector import BlobCollector
from devpi_twisted.storage.plugin import openBackends
from devpi_twisted.storage.pruner import HistoryPruner
from devpi_twisted.services.events import EventDispatcher
from devpi_twisted.storage.threads import ThreadRunner
from devpi_twisted.web.changelog import FeedStopper

__all__ = ["Options", "makeService"]


def makeService(options: Options, reactor: Any = None, checkListen: bool | None = None) -> MultiService:
    """
    Build the whole server from its options.  C{checkListen}: first try
    binding each C{--listen} address (default: when run by twistd, not with
    a reactor given by a test).
    """
    if checkListen is None:
        checkListen = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    config = options.toConfig()
    listen = list(config.listen)
    if config.workers > 1:
        # Every process of --workers listens on the same ports (devpi_twisted.app.workers).
        listen = [reusePortDescription(description) for description in listen]
    # Endpoints are parsed (key and certificate files read) before anything
    # is opened; the site is given to them below.
    listeners = []
    for description in listen:
        try:
            listeners.append(strports.service(endpointDescription(description), None, reactor=reactor))
        except Exception as e:
            sys.stderr.write(f"devpi-twisted: {listenSyntaxError(description, e)}\n")
            raise SystemExit(1)
    # Before the directory is initialised: a first start that cannot listen
    # must not spend the one showing of root's generated password.  The
    # user's own --listen is checked, not its reuseport rewriting: another
    # server on the port must count even if it shares with SO_REUSEPORT.
    for description in config.listen if checkListen else ():
        problem = bindProblem(description)
        if problem is not None:
            sys.stderr.write(f"devpi-twisted: {problem}\n")
            raise SystemExit(1)
    try:
        serverdir = openServerDir(config, noRootPypi=bool(options["no-root-pypi"]))
    except (ServerDirError, StorageError, StorageUnavailable) as e:
        sys.stderr.write(f"devpi-twisted: {e}\n")
        raise SystemExit(1)
    # Stopped one child at a time, last first: listeners and requests in
    # flight, then mirrors, storage, threads (devpi_twisted.app.shutdown).
    top = SequentialStopService()
    if config.jsonLog:
        JSONLogService(config.jsonLog).setServiceParent(top)
    runner = ThreadRunner(reactor)
    runner.setServiceParent(top)
    try:
        storage, blobs = openBackends(config.backend, serverdir.path, runner)
    except (StorageError, StorageUnavailable) as e:
        serverdir.unlock()
        sys.stderr.write(f"devpi-twisted: {e}\n")
        raise SystemExit(1)
    storageService = StorageService(serverdir, storage, blobs, reactor, config.requestsOnly)
    storageService.setServiceParent(top)
    collector = None
    if not config.requestsOnly and config.blobCollectInterval > 0:
        # Stopped before storage (children stop last first).
        collector = BlobCollector(storage, blobs, reactor, config.blobCollectInterval,
                                  ready=storageService.whenReady)
        collector.setServiceParent(top)

    try:
        if config.secretFile:
            secret = loadSecretFile(config.secretFile)
        elif ISharedSecret.providedBy(storage):
            # Nodes sharing the state share the secret: a login made on one is good on all.
            secret = ISharedSecret(storage).sharedSecret(serverdir.secret())
        else:
            secret = serverdir.secret()
    except (ServerDirError, StorageUnavailable) as e:
        sys.stderr.write(f"devpi-twisted: {e}\n")
        raise SystemExit(1)
    nodeinfo = serverdir.nodeinfo()
    ownNode = nodeinfo["uuid"]  # this node's, even when the nodes sharing the state show one uuid
    if ISharedSecret.providedBy(storage) and config.primaryURL is None:
        try:
            nodeinfo = {**nodeinfo, "uuid": ISharedSecret(storage).sharedUUID(nodeinfo["uuid"])}
        except StorageUnavailable as e:
            sys.stderr.write(f"devpi-twisted: {e}\n")
            raise SystemExit(1)
    upstreamAgent, upstreamPoolService = upstreamPool(config, reactor)
    primaryAgent, primaryPoolService = primaryPool(config, reactor) if config.primaryURL else (None, None)
    server = buildServer(
        config,
        reactor=reactor,
        nodeinfo=nodeinfo,
        storage=storage,
        blobs=blobs,
        runner=runner,
        secret=secret,
        upstreamAgent=upstreamAgent,
        primaryAgent=primaryAgent,
        storageReady=storageService.whenReady,
        updateNodeinfo=serverdir.updateNodeinfo,
        collector=collector,
        spoolDirectory=serverdir.spoolDirectory().path,
    )
    upstreamPoolService.setServiceParent(server.mirrors)
    server.mirrors.setServiceParent(top)
    if server.replica is not None:
        assert primaryPoolService is not None
        replicaServices = MultiService()
        primaryPoolService.setServiceParent(replicaServices)
        server.replica.setServiceParent(replicaServices)
        replicaServices.setServiceParent(top)
    pruner = None
    if not config.requestsOnly and config.historyPruneInterval > 0:
        # The main process prunes history (stopped before storage), after
        # what this node's event subscribers still need (below).
        pruner = HistoryPruner(storage, reactor, config.historyPruneInterval, config.historyKeep,
                               ready=storageService.whenReady)
        pruner.setServiceParent(top)
    if server.searchIndexer is not None:
        # Follows the changelog into the search index (stopped before storage).
        server.searchIndexer.setServiceParent(top)
    if deliversEvents(config):
        # Only a primary's main process delivers events (stopped before storage).
        events = eventServices(config, storage, reactor, runner, ownNode, ready=storageService.whenReady)
        events.setServiceParent(top)
        for service in events:
            if pruner is not None and isinstance(service, EventDispatcher):
                pruner.addNeeded(service.neededSerial)
    if runsRetention(config):
        # Only a primary's main process, like the blob collector (stopped before storage).
        retentionSchedule(server, reactor, ready=storageService.whenReady).setServiceParent(top)
    drain = DrainService(server.site, config.shutdownGrace)
    if config.workers > 1:
        # The children get SIGTERM while this process drains its own requests.
        drainAndWorkers = MultiService()
        drain.setServiceParent(drainAndWorkers)
        WorkerPool(
            reactor, config.workers,
            lambda: childCommand(options, listen, dict(os.environ)),
            ready=storageService.whenReady,
            stopTimeout=config.shutdownGrace + 10,
            path=os.getcwd(),
        ).setServiceParent(drainAndWorkers)
        web = WebService(drainAndWorkers)
    else:
        web = WebService(drain)
    watch = parentWatch(reactor, os.environ) if config.requestsOnly else None
    if watch is not None:
        watch.setServiceParent(top)
    for listener in listeners:
        listener.factory = server.site
        web.addListener(listener)
    FeedStopper(server.feed).setServiceParent(web)  # stopped first: long polls must not hold up the drain
    web.setServiceParent(top)
    ExitZeroOnSIGTERM(reactor).setServiceParent(top)
    # Everything built so far lives as long as the process: out of the
    # garbage collector's sight, a full collection pauses the reactor for a
    # fraction of the time (milliseconds instead of tens of them).
    reactor.callWhenRunning(gc.freeze)
    return top
