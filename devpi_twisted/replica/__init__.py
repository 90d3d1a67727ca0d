"""
Replication: a replica follows its primary's changelog, keeps its files,
and forwards writes to it.
"""
