"""Mirror indexes: the upstream client, the online/offline machine, and the cache."""
