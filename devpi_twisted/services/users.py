"""
Users: create, read, modify, delete, as devpi-server does.

Every change is one storage transaction, and the checks that depend on the
state (exists? owns a non-volatile index?) run inside it, so two concurrent
requests cannot both succeed where only one may.
"""

from typing import Any

from devpi_twisted.services.auth import Authenticator, PasswordHashing, replicaUserConfig
from devpi_twisted.errors import BadRequest, Conflict, Forbidden, NotFound
from devpi_twisted.interfaces import IStorage, IWriteTransaction
from devpi_twisted.model import keys
from devpi_twisted.model.acl import Policy
from devpi_twisted.model.names import checkName
from devpi_twisted.model.timeutil import isoNow

_PROFILE_KEYS = ("email", "title", "description", "custom_data")
_CREATE_KEYS = {"password", "pwhash", *_PROFILE_KEYS}


def _checkProfile(body: dict[str, Any]) -> None:
    """E-mail, title and description are text; custom_data may be any JSON."""
    for key in ("email", "title", "description"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadRequest(f"{key!r} must be a string")


def publicUserConfig(name: str, config: dict[str, Any], indexes: dict[str, Any]) -> dict[str, Any]:
    """What C{GET /user} shows: never the password hash."""
    shown = {k: v for k, v in config.items() if k not in ("pwhash", "pwfingerprint")}
    shown["username"] = name
    shown["indexes"] = indexes
    return shown


def indexesOf(view: Any, user: str) -> dict[str, Any]:
    prefix = keys.userIndexesPrefix(user)
    return {key[len(prefix):]: value for key, value in view.items(prefix)}


def replicaChanges(secret: bytes, changes: dict[str, Any]) -> dict[str, Any]:
    """A change's keys and values as replicas are sent them: password hashes replaced by fingerprints."""
    return {
        key: replicaUserConfig(secret, value) if key.startswith(keys.USER) and isinstance(value, dict) else value
        for key, value in changes.items()
    }


async def replicaSnapshot(storage: Any, secret: bytes) -> tuple[int, float | None, dict[str, Any]]:
    """
    The whole current state as a replica may have it (password hashes made
    fingerprints, as in the feed): C{(serial, commit time or None, state)}.
    """
    serial, items = await storage.read(lambda view: (view.serial, view.items("")))
    when = storage.lastCommitTime() if storage.currentSerial() == serial else None
    return serial, when, replicaChanges(secret, dict(items))


class Users:
    """The user operations of the JSON API."""

    def __init__(self, storage: IStorage, auth: Authenticator, policy: Policy) -> None:
        self._storage = storage
        self._auth = auth
        self._policy = policy

    async def listAll(self) -> dict[str, Any]:
        def _list(view: Any) -> dict[str, Any]:
            result = {}
            for key, config in view.items(keys.USER):
                name = key[len(keys.USER):]
                result[name] = publicUserConfig(name, config, indexesOf(view, name))
            return result

        return await self._storage.read(_list)

    async def get(self, name: str) -> dict[str, Any]:
        def _get(view: Any) -> dict[str, Any] | None:
            config = view.get(keys.userKey(name))
            if config is None:
                return None
            return publicUserConfig(name, config, indexesOf(view, name))

        result = await self._storage.read(_get)
        if result is None:
            raise NotFound(f"no user {name!r}")
        return result

    async def passwordHash(self, name: str) -> str | None:
        """The user's stored password hash (tokens are bound to it), if any."""
        config = await self._storage.read(lambda view: view.get(keys.userKey(name)))
        return (config or {}).get("pwhash")

    async def _newPasswordHash(self, body: dict[str, Any]) -> str | None:
        pwhash = body.get("pwhash")
        if pwhash is not None:
            if not PasswordHashing.isHash(pwhash):
                raise BadRequest("'pwhash' must be an argon2 password hash")
            return pwhash
        password = body.get("password")
        if password is None:
            return None
        if not isinstance(password, str):
            raise BadRequest("password must be a string")
        return await self._auth.hashPassword(password)

    async def create(self, requester: str | None, name: str, body: Any) -> dict[str, Any]:
        checkName("username", name)
        if not isinstance(body, dict):
            raise BadRequest("user config must be a JSON object")
        unknown = sorted(set(body) - _CREATE_KEYS)
        if unknown:
            raise BadRequest(f"Unknown keys in user config: {', '.join(unknown)}")
        if "password" not in body:
            raise BadRequest("password needs to be set")
        _checkProfile(body)
        if not self._policy.mayCreateUser(requester):
            raise Forbidden(f"no permission to create user {name}")
        config = {k: body[k] for k in _PROFILE_KEYS if body.get(k) not in (None, "")}
        config["pwhash"] = await self._newPasswordHash(body)
        config["created"] = isoNow()

        def _create(txn: IWriteTransaction) -> dict[str, Any]:
            if txn.get(keys.userKey(name)) is not None:
                raise Conflict("user already exists")
            txn.set(keys.userKey(name), config)
            return publicUserConfig(name, config, {})

        _, result = await self._storage.write(_create)
        return result

    async def modify(self, requester: str | None, name: str, body: Any) -> str | None:
        """
        Apply a PATCH; unknown keys are ignored as devpi does (devpi-client
        sends the whole config back).

        @return: a new login token when the password changed.
        """
        if not isinstance(body, dict):
            raise BadRequest("user config must be a JSON object")
        changes = {k: body[k] for k in ("password", "pwhash", *_PROFILE_KEYS) if k in body}
        _checkProfile(changes)
        passwordOnly = set(changes) <= {"password", "pwhash"}
        if not self._policy.mayModifyUser(requester, name, passwordOnly):
            raise Forbidden(f"no permission to modify user {name}")
        newHash = None
        if changes.get("password") is not None or changes.get("pwhash"):
            # An empty password is a password, as devpi has it: root can go
            # back to devpi-init's "" (devpi-client's own tests do so).
            newHash = await self._newPasswordHash(changes)

        def _modify(txn: IWriteTransaction) -> dict[str, Any]:
            config = txn.get(keys.userKey(name))
            if config is None:
                raise NotFound(f"no user {name!r}")
            for key in _PROFILE_KEYS:
                if key in changes:
                    if changes[key] in (None, "", [], {}):
                        config.pop(key, None)
                    else:
                        config[key] = changes[key]
            if newHash is not None:
                config["pwhash"] = newHash
            config["modified"] = isoNow()
            txn.set(keys.userKey(name), config)
            return config

        _, config = await self._storage.write(_modify)
        if newHash is not None:
            return self._auth.makeToken(name, config["pwhash"])
        return None

    async def delete(self, requester: str | None, name: str) -> None:
        if name == "root":
            raise Forbidden("the root user cannot be deleted")
        if not self._policy.mayDeleteUser(requester, name):
            raise Forbidden(f"no permission to delete user {name}")

        def _delete(txn: IWriteTransaction) -> None:
            if txn.get(keys.userKey(name)) is None:
                raise NotFound(f"no user {name!r}")
            indexes = indexesOf(txn, name)
            for index, config in sorted(indexes.items()):
                if not config.get("volatile", True):
                    raise Forbidden(f"user {name!r} has non-volatile index: {index}")
            for index in indexes:
                deleteIndexContents(txn, name, index)
                txn.delete(keys.indexKey(name, index))
            for prefix in (keys.tokensPrefix(name), keys.tokenUsePrefix(name)):
                for key, _ in txn.items(prefix):
                    txn.delete(key)  # its API tokens go with the user
            txn.delete(keys.userKey(name))

        await self._storage.write(_delete)


def deleteIndexContents(txn: IWriteTransaction, user: str, index: str) -> None:
    """Remove everything stored under one index (its config stays)."""
    for prefix in keys.indexContentPrefixes(user, index):
        for key, _ in txn.items(prefix):
            txn.delete(key)
