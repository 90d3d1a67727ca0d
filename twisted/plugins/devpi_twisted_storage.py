from devpi_twisted.storage.plugin import StorageBackendPlugin

embedded = StorageBackendPlugin(
    "sqlite",
    "SQLite (WAL) metadata and content-addressed files in the server directory",
    "devpi_twisted.storage.embedded:openEmbedded",
)
