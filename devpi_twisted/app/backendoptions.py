"""
The options that choose and reach the storage backends, shared by
C{twistd devpi} and the admin commands (init, passwd, export, import), so a
server and its maintenance commands are pointed at the same state alike.
"""

import os
from typing import Any

from twisted.python import usage

from devpi_twisted.config import BackendSettings

PG_DSN_VARIABLE = "DEVPI_TWISTED_PG_DSN"

BACKEND_PARAMETERS = [
    ["storage", None, "sqlite",
     "Where users, indexes, entries and the changelog live: 'sqlite' (in --serverdir) or "
     "'postgresql' (at --pg-dsn, shared by several nodes)."],
    ["blobs", None, "files",
     "Where file contents live: 'files' (in --serverdir) or 's3' (an S3-compatible bucket)."],
    ["pg-dsn", None, None,
     "PostgreSQL connection: a libpq string ('host=db dbname=devpi user=devpi') or a "
     f"postgresql:// URI (also {PG_DSN_VARIABLE})."],
    ["s3-endpoint", None, None,
     "URL of an S3-compatible service (MinIO, SeaweedFS, Ceph); default AWS's own. Credentials "
     "come the standard AWS way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, roles)."],
    ["s3-bucket", None, None, "The bucket that holds the files (--blobs s3)."],
    ["s3-region", None, None, "The bucket's region (default: the AWS configuration's)."],
    ["s3-prefix", None, "", "Keep the files under this key prefix in the bucket."],
]
BACKEND_FLAGS = [
    ["s3-redirect", None,
     "Answer file downloads with a short-lived presigned URL of the bucket (for a CDN in front "
     "of it) instead of streaming them through the server."],
]


def backendSettings(options: Any, environ: Any = None) -> BackendSettings:
    """
    The L{BackendSettings} of parsed C{options}; a missing C{--pg-dsn} is
    read from C{DEVPI_TWISTED_PG_DSN}.

    @raise usage.UsageError: for a choice that misses what it needs.
    """
    environ = os.environ if environ is None else environ
    storage, blobs = options["storage"], options["blobs"]
    dsn = options["pg-dsn"] or environ.get(PG_DSN_VARIABLE) or None
    if storage == "postgresql" and not dsn:
        raise usage.UsageError(f"--storage postgresql needs --pg-dsn (or {PG_DSN_VARIABLE})")
    if dsn and storage != "postgresql":
        raise usage.UsageError("--pg-dsn is only used with --storage postgresql")
    s3Given = [name for name in ("s3-endpoint", "s3-bucket", "s3-region") if options[name]]
    if blobs == "s3" and not options["s3-bucket"]:
        raise usage.UsageError("--blobs s3 needs --s3-bucket")
    if blobs != "s3" and (s3Given or options["s3-redirect"] or options["s3-prefix"]):
        raise usage.UsageError("the --s3-* options are only used with --blobs s3")
    endpoint = options["s3-endpoint"]
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise usage.UsageError(f"--s3-endpoint {endpoint!r}: must be an http:// or https:// URL")
    prefix = options["s3-prefix"].strip("/")
    return BackendSettings(
        storage=storage,
        blobs=blobs,
        pgDSN=dsn,
        s3Endpoint=endpoint.rstrip("/") if endpoint else None,
        s3Bucket=options["s3-bucket"],
        s3Region=options["s3-region"],
        s3Prefix=prefix + "/" if prefix else "",
        s3Redirect=bool(options["s3-redirect"]),
    )
