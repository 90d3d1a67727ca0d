from devpi_twisted.storage.plugin import BlobBackendPlugin, StorageBackendPlugin

sqlite = StorageBackendPlugin(
    "sqlite",
    "SQLite (WAL) in the server directory (the embedded default)",
    "devpi_twisted.storage.embedded:openSqlite",
)
postgresql = StorageBackendPlugin(
    "postgresql",
    "PostgreSQL 14 or newer at --pg-dsn, shared by every node",
    "devpi_twisted.storage.postgres:openPostgres",
)
files = BlobBackendPlugin(
    "files",
    "content-addressed files under +files/ in the server directory (the embedded default)",
    "devpi_twisted.storage.embedded:openFiles",
)
s3 = BlobBackendPlugin(
    "s3",
    "an S3-compatible bucket (--s3-endpoint, --s3-bucket), shared by every node",
    "devpi_twisted.storage.s3:openS3",
)
