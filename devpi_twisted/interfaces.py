"""
Interfaces of the pluggable parts.

Storage is split in two: L{IStorage} keeps the metadata (a key/value state
with a global serial and a changelog), L{IBlobStore} keeps file contents by
their sha256.  Both are returned by an L{IStorageBackend} plugin, so another
backend (PostgreSQL and an object store, say) can replace the embedded
SQLite + files default without touching the web or domain code.
"""

from zope.interface import Attribute, Interface


class IReadView(Interface):
    """A consistent read-only snapshot of the state at one serial."""

    serial = Attribute("The serial of the last change this view includes (-1: none).")

    def get(key):
        """
        The value at C{key} (JSON-compatible), or C{None} when it is absent.
        """

    def items(prefix):
        """
        A list of C{(key, value)} for every key starting with C{prefix},
        sorted by key.
        """


class IWriteTransaction(IReadView):
    """
    A read-write transaction: reads see its own writes; all of it commits as
    one change with one new serial, or none of it does.
    """

    def set(key, value):
        """Store C{value} (JSON-compatible, not C{None}) at C{key}."""

    def delete(key):
        """Remove C{key}; nothing happens when it is absent."""


class IStorage(Interface):
    """
    The state of the server: a key/value store in which every change raises a
    global serial by one and appends a changelog record.

    Functions passed to L{read} and L{write} run synchronously with a view or
    transaction, possibly in a thread the backend owns, and must not touch the
    reactor.
    """

    def currentSerial():
        """The serial of the last committed change (-1 for an empty store)."""

    def lastCommitTime():
        """The Unix time of the last committed change, or C{None}."""

    def read(function):
        """
        Call C{function(view)} with an L{IReadView} of the current state.

        @return: a Deferred that fires with C{function}'s result.
        """

    def readAsOf(serial, function):
        """
        Call C{function(view)} with an L{IReadView} of the state as it was right
        after the change C{serial}.

        @return: a Deferred with C{function}'s result; it fails with
            L{devpi_twisted.storage.HistoryPruned} when C{serial} is older
            than L{oldestKeptSerial}.
        """

    def write(function):
        """
        Call C{function(txn)} with an L{IWriteTransaction} and commit it.

        Writes are serialised: one transaction at a time.  When C{function}
        raises, nothing is committed and the Deferred fails with its exception.
        A transaction that changes nothing does not raise the serial.

        @return: a Deferred that fires with C{(serial, result)}.
        """

    def applyChange(record):
        """
        Commit a L{devpi_twisted.storage.ChangeRecord} made elsewhere (a
        replica applying its primary's changelog) as one transaction at
        I{its} serial and time, and tell subscribers as L{write} does.

        The record must be the next one: C{record.serial} must equal
        L{currentSerial}C{() + 1}, else the Deferred fails with
        L{devpi_twisted.storage.SerialMismatch} and nothing changes.

        @return: a Deferred that fires with the serial.
        """

    def changesSince(serial, limit):
        """
        The changelog records after C{serial}, oldest first, at most C{limit}.

        @return: a Deferred with a list of L{devpi_twisted.storage.ChangeRecord};
            it fails with L{devpi_twisted.storage.HistoryPruned} when
            C{serial} is older than L{oldestKeptSerial} (records after it
            are gone).
        """

    def oldestKeptSerial():
        """
        The oldest serial that L{readAsOf} and L{changesSince} still answer
        for: -1 while nothing was pruned.  Every later serial is kept
        exactly; the current state never depends on it.

        @return: a Deferred with the serial.
        """

    def pruneHistory(keepFrom, olderThan=None):
        """
        Drop the history that only reads as of serials before C{keepFrom}
        need: older values that were overwritten or deleted by C{keepFrom},
        and the changelog before it.  Afterwards L{oldestKeptSerial} is
        C{keepFrom} (never moved back, and never past L{currentSerial}),
        or, when C{olderThan} (a Unix time) is given and earlier, the last
        serial committed at or before C{olderThan}.
        Large prunes go in several short transactions, so writers are not
        held up long.

        @return: a Deferred with the number of history entries removed.
        """

    def applySnapshot(serial, time, state):
        """
        Replace the whole state with C{state} (a dict of key to value), as
        the state of another store right after its change C{serial} at
        C{time}: a replica whose primary no longer keeps the changes it
        lacks starts over from a copy.  C{serial} must be above
        L{currentSerial}, else L{devpi_twisted.storage.SerialMismatch}.
        Afterwards L{currentSerial} and L{oldestKeptSerial} are C{serial};
        subscribers are told of one record at C{serial} with the keys that
        changed (C{None}: gone).

        @return: a Deferred that fires with the serial.
        """

    def referencedBlobs():
        """
        @return: a Deferred with the set of sha256 digests that current values
            refer to (see L{devpi_twisted.storage.BLOB_REF}).
        """

    def isBlobReferenced(sha256):
        """@return: a Deferred with whether any current value refers to the blob."""

    def subscribe(callback):
        """
        Call C{callback(record)} on the reactor thread after every commit.

        @return: a no-argument callable that unsubscribes.
        """

    def close():
        """Release the store.  @return: a Deferred that fires when closed."""


class IBlobWriter(Interface):
    """
    A file being written to the blob store.

    The steps are: L{write} as often as needed, L{close} (durable, digests
    known), optionally L{read} to inspect the content, then L{commit} to make
    it visible under its sha256, or L{abort} at any point to drop it.
    """

    def write(data):
        """
        Append C{data}.  @return: a Deferred that fires once it is written;
        callers wait for it before writing more, which bounds memory.
        """

    def close():
        """
        Finish writing: flush and fsync.

        @return: a Deferred with a L{devpi_twisted.storage.BlobInfo}.
        """

    def read(function):
        """
        Call C{function(binaryFile)} with the closed content, off the reactor
        thread (to inspect an archive before accepting it).

        @return: a Deferred with C{function}'s result.
        """

    def commit():
        """
        Make the closed blob visible under its sha256 (a no-op when the same
        content is stored already).

        @return: a Deferred with the L{devpi_twisted.storage.BlobInfo}.
        """

    def abort():
        """Drop what was written (also after L{close}).  @return: a Deferred."""


class IBlobStore(Interface):
    """Content-addressed, write-once file contents."""

    def openWriter(extraHashes=()):
        """
        @param extraHashes: names of hashes to compute besides sha256, from
            C{"md5"} and C{"blake2b_256"}.
        @return: a new L{IBlobWriter}.
        """

    def open(sha256):
        """
        Open the blob for reading (bringing it back if L{collect} had
        retired it).

        @return: a Deferred with an L{IBlobReader}, or C{None} when absent.
        """

    def exists(sha256):
        """@return: a Deferred with whether the blob is stored."""

    def delete(sha256):
        """
        Remove one blob the caller knows is no longer referenced (and is not
        being written).  @return: a Deferred.
        """

    def deleteUnreferenced(referenced):
        """
        Remove every blob whose digest is not in the set C{referenced},
        and unfinished temporary files.  Only safe while no writer is open,
        i.e. at startup.

        @return: a Deferred with the number of files removed.
        """

    def collect(referenced, now, grace):
        """
        One pass of the collector that runs beside writers, in two steps
        a C{grace} period apart, so that content stored again meanwhile is
        never lost:

          - a blob not in C{referenced} and not written or stored again
            (a committed writer with the same content counts) for C{grace}
            seconds before C{now} is retired: kept aside, still readable
            through L{open}, which brings it back;
          - a retired blob is brought back if it is in C{referenced}, and
            removed for good once it has been retired for C{grace} seconds.

        C{referenced} must be read from storage before the pass starts.

        @return: a Deferred with a L{devpi_twisted.storage.CollectResult}.
        """


class IBlobReader(Interface):
    """
    An open blob.  Every read answers with a Deferred, so a backend whose
    reads go over the network fits as well as one on the local disk.
    """

    size = Attribute("The blob's size in bytes, known once it is open.")

    def seek(offset):
        """Where the next L{read} starts (no I/O happens here)."""

    def read(size):
        """
        Read from the current position, one read at a time.

        @return: a Deferred with up to C{size} bytes (fewer only at the end,
            C{b""} after it).
        """

    def close():
        """
        Let go of the blob, after the read that may be running.  Closing
        again does nothing.  @return: a Deferred.
        """


class ILocalBlobReader(IBlobReader):
    """
    An optional capability of an L{IBlobReader} whose content is a file on
    this machine: the web layer sends it with C{sendfile(2)}, and code that
    parses it in a thread reads it directly instead of a copy.
    """

    def fileno():
        """
        The file's OS descriptor, valid until L{close}.  Read it only with
        positional reads (C{os.pread}, C{os.sendfile}): the reader's own
        position is not the descriptor's.
        """


class IStorageBackend(Interface):
    """A metadata backend plugin (C{--storage}), found with L{twisted.plugin.getPlugins}."""

    name = Attribute("The value of C{--storage} that selects this backend.")
    description = Attribute("One line for C{--help}.")

    def open(serverdir, runner, settings):
        """
        Open (creating the schema if needed) the metadata store.

        @param serverdir: a L{twisted.python.filepath.FilePath}, this node's
            server directory (the embedded backend keeps its database there).
        @param runner: a L{devpi_twisted.storage.threads.Runner} that runs
            blocking work off the reactor thread.
        @param settings: the L{devpi_twisted.config.BackendSettings}.
        @return: an L{IStorage}.
        """


class IBlobBackend(Interface):
    """A file-contents backend plugin (C{--blobs}), found like L{IStorageBackend}."""

    name = Attribute("The value of C{--blobs} that selects this backend.")
    description = Attribute("One line for C{--help}.")

    def open(serverdir, runner, settings):
        """
        Open the blob store (checking that it can be reached).

        @return: an L{IBlobStore}.
        """


class ISharedSecret(Interface):
    """
    An optional capability of an L{IStorage} that several nodes share: the
    secret that signs login tokens and replication credentials, and the
    server's uuid, are kept with the state (outside the changelog), so a
    token one node made is good on every other, and replicas and clients
    see one server whichever node answers.
    """

    def sharedSecret(candidate):
        """
        The secret stored with the state; C{candidate} (bytes) becomes it
        when there is none yet.  Blocking: called once at startup.

        @return: bytes.
        """

    def sharedUUID(candidate):
        """
        The server's uuid (C{X-Devpi-Uuid}); C{candidate} (this node's own)
        becomes it when there is none yet.  Blocking: called once at startup.

        @return: str.
        """


class IPresigningBlobStore(Interface):
    """
    An optional capability of an L{IBlobStore} behind which clients can
    fetch a blob directly (an S3 bucket, perhaps behind a CDN).
    """

    def presignedURL(sha256, filename, contentType, expires):
        """
        A URL valid for C{expires} seconds that answers the blob's content
        as C{filename} with C{contentType}.  No I/O: signing is local.

        @return: str.
        """


class IEventSubscriber(Interface):
    """
    Something told of every event (L{devpi_twisted.model.events.Event}):
    found as a Twisted plugin (L{devpi_twisted.services.events.SubscriberPlugin})
    or given by the server itself (webhooks).

    Events come in serial order, one at a time, at least once: after a
    restart a subscriber resumes after the last serial it fully handled,
    so an event may come again and should be handled idempotently (by
    C{(serial, ordinal)}).
    """

    name = Attribute("A unique name; the subscriber's position is kept under it.")

    # Optional: wants(events) -> Deferred[bool] (or bool), whether any of a
    # serial's events matter to it; when not, they are passed over without
    # a claim or a position written (the webhooks subscriber has one).

    def deliver(event):
        """
        Handle one event.

        @return: a Deferred; when it fails the same event is delivered again
            later (with a growing delay) and later events wait.
        """


class ISearchIndex(Interface):
    """
    The search index (L{devpi_twisted.services.search}): derived data,
    rebuilt from the state at will, never in the changelog or exports.

    Every method blocks: callers run them in the storage runner's threads.
    Writes carry the position (the last storage serial indexed) they start
    from, and are refused with L{devpi_twisted.storage.searchindex.Moved}
    when the index is elsewhere (another node indexed, or it was cleared).
    """

    def position():
        """The last serial indexed, or -1 (empty: to be built from the state)."""

    def claim(node, now, lease):
        """
        Whether C{node} may index for the next C{lease} seconds (several
        nodes may share one index; one indexes at a time).
        """

    def apply(operations, expected, position):
        """
        Apply L{devpi_twisted.storage.searchindex} operations and set the
        position to C{position}, in one transaction, when the position is
        still C{expected}.
        """

    def stageNames(names):
        """Add C{(name, display)} pairs to the staging list of mirror names."""

    def clearStage():
        """Empty the staging list of mirror names."""

    def namesDigest(index):
        """The digest of the mirror name list indexed for C{index}, or C{None}."""

    def docDigests(pairs):
        """C{{(index, project): sha256}} of the documentation indexed for these projects."""

    def search(query):
        """The L{devpi_twisted.storage.searchindex.IndexHit}s of a L{SearchQuery}, best first by kind."""

    def texts(hits):
        """C{{hit.key: text}}: the description or page text behind hits, to highlight."""

    def clear():
        """Empty the index; its position becomes -1."""

    def close():
        """Release connections."""
